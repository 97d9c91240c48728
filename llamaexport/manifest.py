"""The artifact directory's `manifest.json`: the one file the runtime reads to know what it runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import LlamaExportError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest(artifact_dir) -> dict:
    d = Path(artifact_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise LlamaExportError(f"{d} is not a llamaexport artifact (no {MANIFEST}); build one with `llamaexport build`")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlamaExportError(f"{path} is corrupt ({e}); rebuild the artifact") from None
    if m.get("schema_version") != SCHEMA_VERSION:
        raise LlamaExportError(
            f"{path} has schema version {m.get('schema_version')}, this llamaexport reads {SCHEMA_VERSION}; "
            "rebuild the artifact with this version")
    return m


def write_manifest(artifact_dir, manifest: dict):
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    path = Path(artifact_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)

"""The artifact directory's `manifest.json`: the one file the runtime reads to know what it runs."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
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


@contextmanager
def staging_dir(out: Path, *, force: bool):
    """Yield a temporary sibling of `out`; on success rename it to `out`, on failure delete it.

    Nothing half-written ever appears at `out`."""
    out = Path(out)
    if out.exists() and not force:
        raise LlamaExportError(f"{out} already exists; choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)

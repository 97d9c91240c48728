"""The artifact directory's `manifest.json`: the one file the runtime reads to know what it runs."""

from __future__ import annotations

import hashlib
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


UNHASHED = {MANIFEST, "parity.json"}  # files that change after the build


def file_checksums(artifact_dir) -> dict:
    """{file name: {"bytes", "sha256"}} of every file of an artifact directory but the manifest and the
    parity report (what `verify` and `check` compare, and `run` checks the sizes of)."""
    d = Path(artifact_dir)
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name not in UNHASHED and not p.name.endswith(".tmp"):
            out[p.relative_to(d).as_posix()] = {"bytes": p.stat().st_size, "sha256": file_checksums_of(p)}
    return out


def damaged_files(artifact_dir, manifest: dict, *, hashes: bool = True) -> list[str]:
    """What differs from the checksums the build recorded: one line per missing, resized or (hashes=True)
    changed file. [] for an artifact whose manifest records none (built before checksums existed)."""
    d = Path(artifact_dir)
    problems = []
    for name, want in (manifest.get("checksums") or {}).items():
        p = d / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{name} is {p.stat().st_size} bytes, the build wrote {want['bytes']}")
        elif hashes and file_checksums_of(p) != want["sha256"]:
            problems.append(f"{name} changed since the build (sha256 differs)")
    return problems


def file_checksums_of(path: Path) -> str:
    """The sha256 of one file, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def require_intact(artifact_dir, manifest: dict, *, hashes: bool = True):
    """Raise one line naming the first damaged file (see damaged_files)."""
    problems = damaged_files(artifact_dir, manifest, hashes=hashes)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LlamaExportError(f"{artifact_dir} is damaged: {problems[0]}{more}; rebuild the artifact "
                               "(`llamaexport verify DIR` lists every file)")


def write_manifest(artifact_dir, manifest: dict):
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    path = Path(artifact_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)

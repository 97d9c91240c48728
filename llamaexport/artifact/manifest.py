"""The artifact directory's `manifest.json`: the one file the runtime reads to know what it runs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from llamaexport import LlamaExportError
from llamaexport.model.config import inside

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest(artifact_dir) -> dict:
    d = Path(artifact_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise LlamaExportError(f"{d} is not a llamaexport artifact (no {MANIFEST}); build one with `llamaexport build`")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamaExportError(f"{path} is corrupt ({e}); rebuild the artifact") from None
    problem = manifest_problem(m, d)
    if problem:
        raise LlamaExportError(f"{path}: {problem}; rebuild the artifact with this llamaexport")
    return m


# The manifest's schema: key -> (JSON types it may have, required). Nested objects are checked below.
SCHEMA = {
    "schema_version": ((int,), True), "model": ((dict,), True), "source": ((dict,), True),
    "profile": ((str,), True), "backend": ((str,), True), "precision": ((str,), True),
    "io": ((dict,), True), "files": ((dict,), True), "kv_cache": ((dict,), True),
    "tokenizer": ((list, type(None)), False), "left_padding": ((bool,), False), "plan": ((dict, type(None)), False),
    "runtime": ((dict,), False), "checksums": ((dict,), False), "engine": ((dict, type(None)), False),
    "parity": ((dict, type(None)), False), "chat_format": ((str, type(None)), False),
    "graph": ((dict,), False),
}


def _type_names(types) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "a whole number", bool: "true or false",
             type(None): "null"}
    return " or ".join(names[t] for t in types)


def manifest_problem(m, d: Path) -> str | None:
    """What is wrong with a manifest (naming the key), or None. File names it holds must stay inside d."""
    if not isinstance(m, dict):
        return f"the manifest must be a JSON object, got {type(m).__name__}"
    v = m.get("schema_version")
    if v != SCHEMA_VERSION or isinstance(v, bool):
        return f"schema_version is {v!r}, this llamaexport reads the number {SCHEMA_VERSION}"
    for key, (types, required) in SCHEMA.items():
        if key not in m:
            if required:
                return f"key {key!r} is missing"
            continue
        if not isinstance(m[key], types) or (int in types and isinstance(m[key], bool)):
            return f"key {key!r} must be {_type_names(types)}, got {type(m[key]).__name__}"
    from llamaexport.model.config import LlamaConfig

    try:
        LlamaConfig.from_dict(m["model"])
    except (LlamaExportError, TypeError) as e:  # TypeError: a required field missing
        return f"key model: {e}"
    if m["backend"] not in ("onnxruntime", "tensorrt"):
        return f"key 'backend' is {m['backend']!r}, not onnxruntime or tensorrt"
    from llamaexport.model.chat import FORMATS

    if m.get("chat_format") is not None and m["chat_format"] not in FORMATS:
        return f"key 'chat_format' is {m['chat_format']!r}, not one of {', '.join(FORMATS)}"
    for key, sub in (("io", ("inputs", "outputs")), ("kv_cache", ("form", "dtype"))):
        for k in sub:
            if k not in m[key]:
                return f"key {key}.{k} is missing"
    if not isinstance(m["io"]["inputs"], dict) or not isinstance(m["io"]["outputs"], dict):
        return "keys io.inputs and io.outputs must be objects"
    if m["source"].get("kind") == "random" and not (isinstance(m["source"].get("seed"), int)
                                                    and not isinstance(m["source"].get("seed"), bool)):
        return f"key source.seed must be a whole number, got {m['source'].get('seed')!r}"
    lora = m["source"].get("lora")
    if lora is not None and not (isinstance(lora, list) and all(
            isinstance(a, dict) and isinstance(a.get("path"), str) and isinstance(a.get("fingerprint"), str)
            for a in lora)):
        return "key source.lora must be a list of objects with path and fingerprint (the merged LoRA adapters)"
    if "onnx" not in m["files"]:
        return "key files.onnx is missing"
    names = [("files", v) for v in m["files"].values()] + [("tokenizer", v) for v in m.get("tokenizer") or []]
    names += [("checksums", k) for k in m.get("checksums") or {}]
    if m.get("engine"):
        names.append(("engine.file", m["engine"].get("file")))
    for name, c in (m.get("checksums") or {}).items():
        if not (isinstance(c, dict) and isinstance(c.get("bytes"), int) and isinstance(c.get("sha256"), str)
                and len(c["sha256"]) == 64):
            return f"key checksums.{name} must be an object with bytes and sha256"
    for key, name in names:
        if not isinstance(name, str) or not name:
            return f"key {key} holds {name!r}, not a file name"
        if not inside(d, name):
            return f"key {key} names {name!r}, which is outside the artifact directory"
    return None


UNHASHED = {MANIFEST, "parity.json"}  # files that change after the build


def file_checksums(artifact_dir) -> dict:
    """{file name: {"bytes", "sha256"}} of every file of an artifact directory but the manifest and the
    parity report (what `verify` and `check` compare, and `run` checks the sizes of)."""
    d = Path(artifact_dir)
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name not in UNHASHED and not p.name.endswith(".tmp"):
            out[p.relative_to(d).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
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
        elif hashes and sha256_of(p) != want["sha256"]:
            problems.append(f"{name} changed since the build (sha256 differs)")
    return problems


def sha256_of(path: Path) -> str:
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
        raise LlamaExportError(damage_message(artifact_dir, problems))


def damage_message(artifact_dir, problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (f"{artifact_dir} is damaged: {problems[0]}{more}; rebuild the artifact "
            "(`llamaexport verify DIR` lists every file)")


def write_atomically(path, write) -> Path:
    """Write `path` through write(binary file) into a hidden temporary sibling (`.NAME.PID.tmp`: one
    per process, and file_checksums skips *.tmp), renamed when complete: a reader never sees half a
    file, and a failure leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_manifest(artifact_dir, manifest: dict):
    """Write atomically so a reader never sees half a manifest."""
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    write_atomically(Path(artifact_dir) / MANIFEST, lambda f: f.write(text.encode()))

"""`llamaexport build`: compose the stages into an artifact directory.

checkpoint -> export (model.onnx) -> [quantize] -> per-profile build -> manifest.json
Everything is written to a temporary sibling directory and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import time
from pathlib import Path

from llamaexport import LlamaExportError, __version__, log
from llamaexport.artifact.manifest import SCHEMA_VERSION, file_checksums, read_manifest, require_intact, write_manifest
from llamaexport.artifact.staging import staging_dir, target_lock
from llamaexport.build.profiles import load_profile
from llamaexport.build.recipe import Recipe
from llamaexport.model.kv_form import KVForm


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"llamaexport": __version__, "python": platform.python_version()}
    for pkg in ("onnx", "onnxruntime", "torch", "tensorrt", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def build(*, out, checkpoint=None, size=None, profile="cpu", precision="auto", tokenizer=None,
          max_seq_len=None, seed=0, force=False, export_only=False, block_size=None, memory_gb=None,
          quant_method="auto", int4_recipe="accurate", calibration_files=None, chat_format=None,
          lora=None, kv_cache="auto", progress=True) -> Path:
    """Build an artifact directory; returns its path. See the module docstring for the stages.

    precision: auto (the most accurate that fits the profile) or one of recipe.PRECISIONS;
    int4_recipe, block_size, quant_method: see recipe.Recipe.resolve; calibration_files: text to
    calibrate AWQ / SmoothQuant on instead of the shipped text; chat_format: one of chat.FORMATS, recorded
    in the manifest as the format `run --chat`, `chat` and `serve` use when not given one; lora: PEFT
    LoRA adapter directories merged into the weights in order (lora.apply_lora), recorded in the manifest;
    kv_cache: auto, concat or inplace, the GPU graph's KV-cache form (recipe.kv_cache_for: auto follows the
    TensorRT that builds the engine, or the profile's tensorrt_version for --export-only)."""
    from llamaexport.build.planner import choose
    from llamaexport.build.recipe import kv_cache_for
    from llamaexport.model.chat import check_format
    from llamaexport.model.checkpoint import load_checkpoint

    t0 = time.time()
    if chat_format is not None:
        check_format(chat_format)
    prof = load_profile(profile, memory_gb=memory_gb)
    installed = None  # the TensorRT that builds the engine now (None: --export-only, compiled on the target)
    if prof.backend == "tensorrt" and not export_only:
        from llamaexport.tensorrt.api import require_tensorrt
        installed = require_tensorrt().__version__
    kv = kv_cache_for(prof, kv_cache, tensorrt=installed)
    ckpt = load_checkpoint(checkpoint, size=size, seed=seed, max_seq_len=max_seq_len)
    if lora:
        from llamaexport.model.lora import apply_lora
        ckpt = apply_lora(ckpt, lora)
    if max_seq_len is None:  # the profile's default context, capped by what the model was trained for
        ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(
            ckpt.config, max_seq_len=min(ckpt.config.max_seq_len, prof.default_context)))
    cfg = ckpt.config
    tok = _load_tokenizer(tokenizer or ckpt.tokenizer_path, required=checkpoint is not None, vocab=cfg.vocab_size)
    # every rule of what to build, validated and resolved once; what cannot fit is refused before any work
    recipes = Recipe.candidates(prof, precision, int4_recipe=int4_recipe, block_size=block_size,
                                quant_method=quant_method, calibration=tok is not None, kv_cache=kv)
    chosen = choose(cfg, prof, recipes, context=cfg.max_seq_len)
    log(f"plan: {chosen.label} on {prof.name}: {chosen.total / 2**30:.2f} GiB of {chosen.budget / 2**30:.1f} GiB, "
        f"decode ceiling {chosen.decode_ceiling:.1f} tok/s")
    out = Path(out)
    with staging_dir(out, force=force) as tmp:
        io = _export(ckpt, tmp, chosen.recipe, tok, calibration_files, progress)
        manifest = _manifest(ckpt, prof, chosen, io, tok.save(tmp) if tok else [], chat_format)
        if prof.backend == "tensorrt":
            manifest["engine"] = None if export_only else _build_engine(tmp, manifest, prof, progress)
        if chosen.recipe.cpu and tok is not None:
            _write_genai_config(tmp, cfg, tok, kv_form=chosen.recipe.kv_form(cfg))
            manifest["files"]["genai_config"] = "genai_config.json"
        manifest["checksums"] = file_checksums(tmp)  # verify / check compare them, run checks the sizes
        manifest["build_seconds"] = round(time.time() - t0, 1)
        write_manifest(tmp, manifest)
    log(f"built {out} in {time.time() - t0:.1f}s")
    return out


def _export(ckpt, out_dir: Path, recipe: Recipe, tok, calibration_files, progress: bool) -> dict:
    """model.onnx(.data) in out_dir, calibrated on the tokenized text when the recipe calibrates."""
    from llamaexport.build.export import export_onnx

    cfg = ckpt.config
    log(f"export: {cfg.n_layers} layers, {cfg.n_params() / 1e9:.2f}B parameters -> {out_dir}/model.onnx")
    calib = None
    if recipe.calibrated:
        from llamaexport.build.awq import calibration_ids
        calib = calibration_ids(tok, cfg.vocab_size, files=calibration_files, n_tokens=recipe.calibration_tokens)
        what = {"gptq": "AWQ + GPTQ", "awq": "AWQ", "smoothquant": "SmoothQuant W8A8"}[recipe.quant_method]
        log(f"quantize: {what}, calibrating on {calib.size} {'tokens' if tok else 'random token ids (no tokenizer)'}")
    return export_onnx(ckpt, out_dir, recipe, calibration=calib, progress=progress)


def _manifest(ckpt, prof, chosen, io: dict, tok_files: list, chat_format: str | None = None) -> dict:
    """manifest.json's content (DESIGN.md); the engine, genai config and build time are added after."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": ckpt.config.to_dict(),
        "source": ckpt.source,
        "profile": prof.name,
        "plan": {"label": chosen.label, "int4_recipe": chosen.recipe.int4_recipe,
                 "total_gib": round(chosen.total / 2**30, 3), "budget_gib": round(chosen.budget / 2**30, 3),
                 "decode_ceiling_tok_s": round(chosen.decode_ceiling, 1)},
        "backend": prof.backend,
        **chosen.recipe.manifest_fields(ckpt.config),
        "files": {"onnx": "model.onnx", "onnx_data": "model.onnx.data"},
        "tokenizer": tok_files or None,
        "chat_format": chat_format,  # None: the tokenizer's template ("auto")
        "io": io,
        # the profile's CPU threads (0 = all; `--threads` overrides) and, for ONNX Runtime on a GPU, device cuda
        "runtime": {"threads": prof.threads, **({"device": "cuda"} if not chosen.recipe.cpu and
                                                 prof.backend == "onnxruntime" else {})},
        "tool_versions": tool_versions(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": None,
        "parity": None,
    }


def _build_engine(tmp, manifest, prof, progress):
    from llamaexport.tensorrt.builder import build_engine

    return build_engine(tmp, manifest, prof, progress=progress)


def _write_genai_config(artifact_dir, cfg, tok, *, kv_form: KVForm):
    """genai_config.json, so onnxruntime-genai users can load the CPU artifact as it is
    (our I/O names are its names; the KV buffer is shared when the graph uses GroupQueryAttention)."""
    import json

    eos = tok.eos_ids[0] if len(tok.eos_ids) == 1 else list(tok.eos_ids)
    config = {
        "model": {
            "type": "llama", "context_length": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
            "bos_token_id": tok.bos_id if tok.bos_id is not None else eos,
            "eos_token_id": eos, "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_ids[0],
            "decoder": {
                "filename": "model.onnx", "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": cfg.head_dim, "hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": cfg.n_layers, "num_key_value_heads": cfg.n_kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"max_length": cfg.max_seq_len, "past_present_share_buffer": kv_form is KVForm.INPLACE,
                   "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0},
    }
    (Path(artifact_dir) / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _load_tokenizer(path, *, required: bool, vocab: int):
    if path is None:
        if required:
            raise LlamaExportError("no tokenizer found next to the checkpoint; pass --tokenizer PATH "
                                   "(tokenizer.model, tokenizer.json or a directory holding one)")
        return None
    from llamaexport.model.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok.vocab_size > vocab:
        raise LlamaExportError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocabulary is {vocab}; "
                               "pass the tokenizer that belongs to this checkpoint")
    return tok


def compile_artifact(artifact_dir, *, profile: str | None = None, force: bool = False) -> dict:
    """Build the engine of an --export-only TensorRT artifact in place; returns its engine entry."""
    from llamaexport.tensorrt.api import require_tensorrt
    from llamaexport.tensorrt.builder import build_engine

    d = Path(artifact_dir)
    m = read_manifest(d)
    if m.get("backend") != "tensorrt":
        raise LlamaExportError(f"{d} is an {m.get('backend')} artifact, there is no engine to compile; "
                               "build it with a TensorRT --profile")
    if m.get("engine") and not force:
        raise LlamaExportError(f"{d} already has an engine ({m['engine']['file']}); pass --force to rebuild it")
    prof = load_profile(profile or m["profile"])
    if prof.backend != "tensorrt":
        raise LlamaExportError(f"profile {prof.name} is for {prof.backend}; choose a TensorRT profile")
    if m["precision"] not in prof.precisions:
        raise LlamaExportError(f"the artifact is {m['precision']}, which profile {prof.name} does not support "
                               f"({', '.join(prof.precisions)}); rebuild the artifact for this profile")
    trt = require_tensorrt(f"run it there, on the GPU the engine is for ({d} stays as it is)",
                           what="`llamaexport compile`")
    with target_lock(d.absolute()):  # no build or other compile writes this artifact meanwhile
        require_intact(d, m)  # new checksums must not bless a damaged model.onnx
        m["engine"] = build_engine(d, m, prof, progress=True)
        if "checksums" in m:
            m["checksums"] = file_checksums(d)
        m["profile"], m["parity"] = prof.name, None  # an earlier check ran another backend
        m.setdefault("tool_versions", {})["tensorrt"] = trt.__version__
        write_manifest(d, m)
    return m["engine"]

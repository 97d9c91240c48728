"""`llamaexport build`: compose the stages into an artifact directory.

checkpoint -> export (model.onnx) -> [quantize] -> per-profile build -> manifest.json
Everything is written to a temporary sibling directory and renamed at the end.
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from pathlib import Path

from . import LlamaExportError, __version__
from .manifest import SCHEMA_VERSION, staging_dir, write_manifest
from .profiles import load_profile


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


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
          quant_method="auto", int4_recipe="accurate", calibration_files=None, progress=True) -> Path:
    """Build an artifact directory; returns its path. See the module docstring for the stages."""
    from .checkpoint import load_checkpoint
    from .export import ROLES, activation_dtype, export_onnx, fused_attention, lm_head_precision, quantized_embedding
    from .quantize import BLOCK_SIZES, resolve_blocks, tensor_precision
    from .planner import choose

    t0 = time.time()
    prof = load_profile(profile, memory_gb=memory_gb)
    if precision != "auto" and precision not in prof.precisions:
        raise LlamaExportError(f"precision {precision} is not supported by profile {prof.name}; "
                               f"choose one of {', '.join(prof.precisions)}")
    if int4_recipe not in ("accurate", "compact"):
        raise LlamaExportError(f"unknown --int4-recipe {int4_recipe!r}; choose accurate or compact")
    if int4_recipe == "compact" and precision != "int4":
        raise LlamaExportError("--int4-recipe compact applies to int4 only; add --precision int4")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise LlamaExportError(f"--block-size {block_size} is not supported; choose "
                               f"{', '.join(map(str, BLOCK_SIZES[:-1]))} or {BLOCK_SIZES[-1]}")
    if prof.backend == "tensorrt" and not export_only:
        from .trt_build import require_tensorrt
        require_tensorrt()
    ckpt = load_checkpoint(checkpoint, size=size, seed=seed, max_seq_len=max_seq_len)
    cfg = ckpt.config
    if not max_seq_len:  # the profile's default context, capped by what the model was trained for
        cfg.max_seq_len = min(cfg.max_seq_len, prof.default_context)
    # refuse what cannot fit before any work is done
    # an explicit --block-size sets every block; by default 4-bit blocks are 32 (CPU compact: 64) and the
    # CPU graph's 8-bit layer projections 128 (quantize.resolve_blocks)
    chosen = choose(cfg, prof, precision, context=cfg.max_seq_len, block=block_size, compact=int4_recipe == "compact")
    precision = chosen.precision
    log(f"plan: {chosen.label} on {prof.name}: {chosen.total / 2**30:.2f} GiB of {chosen.budget / 2**30:.1f} GiB, "
        f"decode ceiling {chosen.decode_ceiling:.1f} tok/s")
    tok = _load_tokenizer(tokenizer or ckpt.tokenizer_path, required=checkpoint is not None, vocab=cfg.vocab_size)
    out = Path(out)
    with staging_dir(out, force=force) as tmp:
        log(f"export: {cfg.n_layers} layers, {cfg.n_params() / 1e9:.2f}B parameters -> {out}/model.onnx")
        target = prof.export_target
        method = _quant_method(quant_method, precision, tok, compact=not chosen.protect)
        calib = None
        if method in ("gptq", "awq", "smoothquant"):
            from .awq import calibration_ids
            calib = calibration_ids(tok, cfg.vocab_size, files=calibration_files)
            what = {"gptq": "AWQ + GPTQ", "awq": "AWQ", "smoothquant": "SmoothQuant W8A8"}[method]
            log(f"quantize: {what}, calibrating on {calib.size} {'tokens' if tok else 'random token ids (no tokenizer)'}")
        blocks = resolve_blocks(precision, chosen.protect, target, block_size)  # (block, 8-bit block)
        io = export_onnx(ckpt, tmp, precision=precision, target=target, block_size=block_size,
                         calibration=calib, progress=progress, int4_protect=chosen.protect, gptq=method == "gptq")
        tok_files = tok.save(tmp) if tok else []
        left_padding = not fused_attention(cfg, target)
        float_name = {"float32": "fp32", "float16": "fp16"}[activation_dtype(precision, target)]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model": cfg.to_dict(),
            "source": ckpt.source,
            "profile": prof.name,
            "plan": {"label": chosen.label, "int4_protect": chosen.protect,
                     "int4_recipe": chosen.int4_recipe,
                     "total_gib": round(chosen.total / 2**30, 3), "budget_gib": round(chosen.budget / 2**30, 3),
                     "decode_ceiling_tok_s": round(chosen.decode_ceiling, 1)},
            "backend": prof.backend,
            "precision": precision,
            "export_target": target,
            # GroupQueryAttention (the fused CPU attention) does not take left-padded rows
            "left_padding": left_padding,
            "block_size": blocks[0] if precision in ("int8", "int4") else None,
            # the CPU graph's MatMulNBits block of each quantized role (8-bit layer projections: 128, see quantize.cpu_block)
            "tensor_blocks": _cpu_blocks(precision, target, chosen.protect, *blocks),
            "quantization": "awq+gptq" if method == "gptq" else method,
            # the precision of each linear role (int4 keeps some at 8 bits; see quantize.tensor_precision)
            "tensor_precisions": {**{r: tensor_precision(precision, r, target, chosen.protect) for r in ROLES.values()},
                                  "lm_head": lm_head_precision(precision, target, chosen.protect) or float_name,
                                  "embedding": "int8" if quantized_embedding(precision, target, cfg.dim) else float_name},
            # past_present_shared: the same max-length buffer may be bound as past and present
            # (GroupQueryAttention writes the new entries in place); plain past/present works too
            "kv_cache": {"form": "past_present" if left_padding else "past_present_shared",
                         "dtype": io["inputs"]["past_key_values.0.key"]["dtype"]},
            "files": {"onnx": "model.onnx", "onnx_data": "model.onnx.data"},
            "tokenizer": tok_files or None,
            "io": io,
            "tool_versions": tool_versions(),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": None,
            "parity": None,
        }
        if prof.backend == "tensorrt":
            manifest["engine"] = None if export_only else _build_engine(tmp, manifest, prof, progress)
        if prof.backend == "onnxruntime" and tok is not None:
            _write_genai_config(tmp, cfg, tok, shared_kv=not left_padding)
            manifest["files"]["genai_config"] = "genai_config.json"
        manifest["build_seconds"] = round(time.time() - t0, 1)
        write_manifest(tmp, manifest)
    log(f"built {out} in {time.time() - t0:.1f}s")
    return out


def _build_engine(tmp, manifest, prof, progress):
    from .trt_build import build_engine

    return build_engine(tmp, manifest, prof, progress=progress)


def _write_genai_config(artifact_dir, cfg, tok, *, shared_kv: bool):
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
        "search": {"max_length": cfg.max_seq_len, "past_present_share_buffer": shared_kv, "do_sample": False,
                   "num_beams": 1, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0},
    }
    (Path(artifact_dir) / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _cpu_blocks(precision: str, target: str, protect: bool, block: int, block8: int) -> dict | None:
    """The CPU graph's MatMulNBits block of each quantized role (quantize.cpu_block), or None."""
    from .export import ROLES, lm_head_precision
    from .quantize import cpu_block, tensor_precision

    if target != "ort-cpu" or precision not in ("int8", "int4"):  # (w8a8 is a TensorRT precision)
        return None
    blocks = {}
    for role in ROLES.values():
        blocks[role] = cpu_block(tensor_precision(precision, role, target, protect), block, block8=block8)
    head = lm_head_precision(precision, target, protect)
    if head is not None:
        blocks["lm_head"] = cpu_block(head, block, lm_head=True)
    return blocks


def _quant_method(method: str, precision: str, tok, *, compact: bool = False) -> str | None:
    """None for float precisions; `auto`, when there is text to calibrate on: gptq (AWQ scales,
    then GPTQ rounding) for an all-4-bit model (compact: every linear at 4 bits), else awq (AWQ,
    importance-weighted rounding); without text RTN. GPTQ pays where 4-bit error dominates:
    SmolLM2 compact int4's KL on the held-out text 0.119 -> 0.094 at block 32 (top-1 0.786 -> 0.818),
    0.167 -> 0.122 at 64. With
    the sensitive projections at 8 bits (the accurate recipe) it moved the held-out KL only
    0.0305 -> 0.0302 (CPU) and 0.0355 -> 0.0330 (TensorRT graph) while `check`'s KL, measured on
    each artifact's own greedy tokens, went either way (0.046 -> 0.039; 0.042 -> 0.056); int8:
    0.0018 -> 0.0016. It costs build time (a Python loop over the input channels). w8a8 is
    always SmoothQuant (its static activation scales need calibration)."""
    if precision == "w8a8":
        if method in ("rtn", "awq", "gptq"):
            raise LlamaExportError(f"--quant-method {method} does not apply to w8a8, which is calibrated with "
                                   "SmoothQuant; leave --quant-method at auto")
        return "smoothquant"
    if precision not in ("int8", "int4"):
        return None
    if method == "auto":
        return ("gptq" if precision == "int4" and compact else "awq") if tok is not None else "rtn"
    if method not in ("rtn", "awq", "gptq"):
        raise LlamaExportError(f"unknown quantization method {method!r}; choose auto, rtn, awq or gptq")
    return method


def _load_tokenizer(path, *, required: bool, vocab: int):
    if path is None:
        if required:
            raise LlamaExportError("no tokenizer found next to the checkpoint; pass --tokenizer PATH "
                                   "(tokenizer.model, tokenizer.json or a directory holding one)")
        return None
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok.vocab_size > vocab:
        raise LlamaExportError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocabulary is {vocab}; "
                               "pass the tokenizer that belongs to this checkpoint")
    return tok

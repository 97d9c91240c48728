"""`llamaexport inspect`: the manifest as a readable table."""

from __future__ import annotations


def format_manifest(m: dict) -> str:
    cfg = m["model"]
    src = m.get("source", {})
    source = f"random weights, seed {src.get('seed')}" if src.get("kind") == "random" else \
        f"{src.get('kind')} {src.get('path')} ({src.get('fingerprint', '')})"
    n_in, n_out = len(m["io"]["inputs"]), len(m["io"]["outputs"])
    parity = m.get("parity")
    rows = [
        ("profile", f"{m['profile']} ({m['backend']})"),
        ("precision", ((m.get("plan") or {}).get("label") or m["precision"])
                      + ("" if not m.get("tensor_precisions") else " (" + ", ".join(
                          f"{k.removesuffix('_proj')} {v}" for k, v in m["tensor_precisions"].items()) + ")")),
        ("model", f"{cfg['n_layers']} layers, dim {cfg['dim']}, {cfg['n_heads']} heads / {cfg['n_kv_heads']} KV heads, "
                  f"head_dim {cfg['head_dim']}, FFN {cfg['ffn_dim']}, vocab {cfg['vocab_size']}"),
        ("rope", f"theta {cfg['rope_theta']:g}, dim {cfg['rope_dim']}"
                 + (f", scaling {cfg['rope_scaling']['rope_type']}" if cfg.get("rope_scaling") else "")
                 + (f" x{cfg['rope_scaling']['factor']:g}" if (cfg.get("rope_scaling") or {}).get("factor") else "")),
        ("context", str(cfg["max_seq_len"])),
        ("tied embeddings", "yes" if cfg["tie_embeddings"] else "no"),
        ("source", source),
        *[("lora", _lora(a)) for a in src.get("lora") or []],
        ("tokenizer", ", ".join(m["tokenizer"]) if m.get("tokenizer") else "none"),
        ("chat format", m.get("chat_format") or "auto (not recorded)"),
        ("files", ", ".join(f"{k}: {v}" for k, v in m["files"].items())),
        ("kv cache", f"{m['kv_cache']['form']} ({m['kv_cache']['dtype']})" + _graph(m)),
        ("quantization", f"{m.get('quantization') or 'none'}" + _blocks(m)),
        ("plan", f"{m['plan']['total_gib']} GiB of {m['plan']['budget_gib']} GiB, decode ceiling "
                 f"{m['plan']['decode_ceiling_tok_s']} tok/s" if m.get("plan") else "n/a"),
        ("engine", _engine(m)),
        ("onnx i/o", f"{n_in} inputs, {n_out} outputs (input_ids, attention_mask, position_ids, "
                     "past_key_values.N.key/value -> logits, present.N.key/value)"),
        ("parity", "not checked" if not parity else ("PASS" if parity.get("passed") else "FAIL")
                   + (f" (run with {parity['backend']})" if parity.get("backend") else "")
                   + "".join(f", {k} {v:.3g}" for k, v in parity.items() if isinstance(v, float))),
        ("built", f"{m.get('built_at')} in {m.get('build_seconds')}s"),
        ("tools", ", ".join(f"{k} {v}" for k, v in m.get("tool_versions", {}).items())),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _lora(a: dict) -> str:
    """One merged adapter: path, rank, alpha, what it adapts or replaces, fingerprint."""
    what = ", ".join(a.get("modules") or []) + (f"; replaces {', '.join(a['replaced'])}" if a.get("replaced") else "")
    changes = "".join(f", {k} {v[0]} -> {v[1]}" for k, v in (a.get("changes") or {}).items())
    return (f"{a['path']} (r {a.get('r')}, alpha {a.get('alpha')}{', rslora' if a.get('use_rslora') else ''}: {what}"
            f"{changes}) ({a['fingerprint']})")


def _engine(m: dict) -> str:
    if m.get("backend") != "tensorrt":
        return "n/a (ONNX Runtime)"
    e = m.get("engine")
    if not e:
        return "not built (--export-only): run `llamaexport compile DIR` on the target"
    return f"{e.get('file')} (TensorRT {e.get('tensorrt')}, {len(e.get('profiles', []))} profiles)"


def _blocks(m: dict) -> str:
    """", block 32" or, where the CPU graph's roles differ (Recipe.form), ", blocks qkv_proj 128, ..."."""
    blocks = m.get("tensor_blocks")
    if blocks and len(set(blocks.values())) > 1:
        return ", blocks " + ", ".join(f"{r} {b}" for r, b in blocks.items())
    return f", block {m['block_size']}" if m.get("block_size") else ""


def _graph(m: dict) -> str:
    """"; updated by TensorScatter, attention: Attention, opset 24, TensorRT >= 10.15" from the manifest's graph."""
    g = m.get("graph")
    if not g:
        return ""
    trt = f", TensorRT >= {g['min_tensorrt']}" if g.get("min_tensorrt") else ""
    return f"; updated by {g['kv_update']}, attention: {g['attention']}, opset {g['opset']}{trt}"

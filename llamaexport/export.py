"""Export: a checkpoint -> model.onnx + model.onnx.data with the KV cache in past/present form.

The graph is written directly (no tracing), one layer at a time: each layer's weights are
loaded, transposed/fused, appended to the external data file and dropped before the next
layer, so peak memory is about one layer whatever the model size.

Graph (names follow DESIGN.md; node names are hierarchical for Netron):
  h = embed[input_ids]; cos/sin = tables[position_ids]; bias = causal & attention_mask
  per layer: x = RMSNorm(h); q,k,v = Split(x @ Wqkv); q,k = RoPE(q,k); present = past ++ k,v
             h += softmax(q k^T + bias) v @ Wo;  h += SwiGLU(RMSNorm(h) @ W13) @ W2
  logits = RMSNorm(h) @ W_out^T  (float32)
"""

from __future__ import annotations

import numpy as np

from . import LlamaExportError, custom_ops
from .checkpoint import Checkpoint
from .config import LlamaConfig, rope_tables
from .onnx_graph import GraphBuilder

OPSET = 21  # DequantizeLinear block_size / INT4 need 21; TensorRT 10.x and ORT parse it


def io_spec(cfg: LlamaConfig, kv_dtype: str = "float32") -> dict:
    """The ONNX I/O contract (DESIGN.md) as data: name -> {dtype, shape}."""
    kv = [f"batch", cfg.n_kv_heads, "past_seq", cfg.head_dim]
    inputs = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
        "attention_mask": {"dtype": "int64", "shape": ["batch", "total_seq"]},
        "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
    }
    outputs = {"logits": {"dtype": "float32", "shape": ["batch", "seq", cfg.vocab_size]}}
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = {"dtype": kv_dtype, "shape": kv}
            outputs[f"present.{i}.{kind}"] = {"dtype": kv_dtype, "shape": kv[:2] + ["total_seq", kv[3]]}
    return {"inputs": inputs, "outputs": outputs}


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="layer", leave=True)


def export_onnx(ckpt: Checkpoint, out_dir, *, precision: str = "fp32", progress: bool = True) -> dict:
    """Write `out_dir/model.onnx` and `out_dir/model.onnx.data`; return the I/O spec.

    precision: fp32 (fp16 and the quantized forms are added by `quantize`)."""
    from onnx import TensorProto

    from pathlib import Path

    if precision != "fp32":
        raise LlamaExportError(f"export writes fp32 graphs; precision {precision!r} is applied by quantize")
    cfg, W = ckpt.config, ckpt.weights
    out_dir = Path(out_dir)
    g = GraphBuilder(out_dir / "model.onnx.data", opset=OPSET)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    H, K, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim

    g.use_domain(custom_ops.DOMAIN)
    g.add_function(custom_ops.rope_function(head_dim=hd, rotary_dim=cfg.rope_dim, interleaved=True))
    g.add_function(custom_ops.swiglu_function())

    spec = io_spec(cfg)
    for name, s in spec["inputs"].items():
        g.input(name, i64 if s["dtype"] == "int64" else f32, s["shape"])

    # ---- shared prologue: embeddings, rotary tables, attention bias
    emb = W["tok_embeddings.weight"]  # [V, D]
    g.weight("model.embed_tokens.weight", emb)
    h = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], name="/model/embed_tokens/Gather")
    cos, sin = rope_tables(cfg)
    g.weight("model.rotary.cos_cache", cos)
    g.weight("model.rotary.sin_cache", sin)
    cos = g.op("Gather", ["model.rotary.cos_cache", "position_ids"], name="/model/rotary/cos/Gather")  # [B, S, rd/2]
    sin = g.op("Gather", ["model.rotary.sin_cache", "position_ids"], name="/model/rotary/sin/Gather")
    bias = _attention_bias(g)

    bar = _progress(cfg.n_layers, "export", progress)
    for i in range(cfg.n_layers):
        p, pre = f"layers.{i}.", f"/model/layers.{i}"
        x = _rmsnorm(g, h, W[p + "attention_norm.weight"], cfg.norm_eps, f"{pre}/input_layernorm")
        # fused QKV; the 1/sqrt(hd) softmax scale is folded into the q rows (exact for hd=64)
        wq = W[p + "attention.wq.weight"] * np.float32(hd ** -0.5)
        wqkv = np.concatenate([wq, W[p + "attention.wk.weight"], W[p + "attention.wv.weight"]]).T
        g.weight(f"model.layers.{i}.attn.qkv_proj.weight", wqkv)
        del wq, wqkv
        qkv = g.op("MatMul", [x, f"model.layers.{i}.attn.qkv_proj.weight"], name=f"{pre}/attn/qkv_proj/MatMul")
        q, k, v = g.op("Split", [qkv, g.const([H * hd, K * hd, K * hd])], name=f"{pre}/attn/qkv/Split", n_out=3, axis=-1)
        heads = {}
        for nm, t, n in (("q", q, H), ("k", k, K), ("v", v, K)):
            t = g.op("Reshape", [t, g.const([0, 0, n, hd])], name=f"{pre}/attn/{nm}/Reshape")
            heads[nm] = g.op("Transpose", [t], name=f"{pre}/attn/{nm}/Transpose", perm=[0, 2, 1, 3])  # [B, n, S, hd]
        q = g.op("RoPE", [heads["q"], cos, sin], name=f"{pre}/attn/q_rope/RoPE", domain=custom_ops.DOMAIN,
                 interleaved=1, rotary_dim=cfg.rope_dim, **custom_ops.plugin_attrs())
        k = g.op("RoPE", [heads["k"], cos, sin], name=f"{pre}/attn/k_rope/RoPE", domain=custom_ops.DOMAIN,
                 interleaved=1, rotary_dim=cfg.rope_dim, **custom_ops.plugin_attrs())
        pk = g.op("Concat", [f"past_key_values.{i}.key", k], name=f"{pre}/attn/k_cache/Concat",
                  outputs=[f"present.{i}.key"], axis=2)  # [B, K, T, hd]
        pv = g.op("Concat", [f"past_key_values.{i}.value", heads["v"]], name=f"{pre}/attn/v_cache/Concat",
                  outputs=[f"present.{i}.value"], axis=2)
        # grouped-query attention without copying K/V: view q as [B, K, rep*S, hd]
        qg = g.op("Reshape", [q, g.const([0, K, -1, hd])], name=f"{pre}/attn/q_group/Reshape")
        kt = g.op("Transpose", [pk], name=f"{pre}/attn/k/TransposeT", perm=[0, 1, 3, 2])
        s = g.op("MatMul", [qg, kt], name=f"{pre}/attn/qk/MatMul")  # [B, K, rep*S, T]
        s = g.op("Reshape", [s, g.const([0, H, -1, 0])], name=f"{pre}/attn/scores/Reshape")  # [B, H, S, T]
        s = g.op("Add", [s, bias], name=f"{pre}/attn/mask/Add")
        s = g.op("Softmax", [s], name=f"{pre}/attn/Softmax", axis=-1)
        s = g.op("Reshape", [s, g.const([0, K, -1, 0])], name=f"{pre}/attn/probs/Reshape")
        o = g.op("MatMul", [s, pv], name=f"{pre}/attn/pv/MatMul")  # [B, K, rep*S, hd]
        o = g.op("Reshape", [o, g.const([0, H, -1, hd])], name=f"{pre}/attn/o/Reshape")
        o = g.op("Transpose", [o], name=f"{pre}/attn/o/Transpose", perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, g.const([0, 0, H * hd])], name=f"{pre}/attn/o/Merge")
        g.weight(f"model.layers.{i}.attn.o_proj.weight", W[p + "attention.wo.weight"].T)
        o = g.op("MatMul", [o, f"model.layers.{i}.attn.o_proj.weight"], name=f"{pre}/attn/o_proj/MatMul")
        h = g.op("Add", [h, o], name=f"{pre}/attn/residual/Add")

        x = _rmsnorm(g, h, W[p + "ffn_norm.weight"], cfg.norm_eps, f"{pre}/post_attention_layernorm")
        w13 = np.concatenate([W[p + "feed_forward.w1.weight"], W[p + "feed_forward.w3.weight"]]).T
        g.weight(f"model.layers.{i}.mlp.gate_up_proj.weight", w13)
        del w13
        gu = g.op("MatMul", [x, f"model.layers.{i}.mlp.gate_up_proj.weight"], name=f"{pre}/mlp/gate_up_proj/MatMul")
        a = g.op("SwiGLU", [gu], name=f"{pre}/mlp/act/SwiGLU", domain=custom_ops.DOMAIN, **custom_ops.plugin_attrs())
        g.weight(f"model.layers.{i}.mlp.down_proj.weight", W[p + "feed_forward.w2.weight"].T)
        d = g.op("MatMul", [a, f"model.layers.{i}.mlp.down_proj.weight"], name=f"{pre}/mlp/down_proj/MatMul")
        h = g.op("Add", [h, d], name=f"{pre}/mlp/residual/Add")
        if bar:
            bar.update(1)
    if bar:
        bar.close()

    x = _rmsnorm(g, h, W["norm.weight"], cfg.norm_eps, "/model/norm")
    if cfg.tie_embeddings:  # reuse the [V, D] embedding: logits = x @ E^T, no second copy
        lm = "model.embed_tokens.weight"
    else:
        lm = g.weight("lm_head.weight", W["output.weight"])
    _lm_head(g, x, lm, cfg)
    for name, s in spec["outputs"].items():
        g.output(name, f32, s["shape"])
    g.save(out_dir / "model.onnx", producer="llamaexport",
           doc=f"LLaMA {cfg.n_layers} layers, dim {cfg.dim}, {precision}")
    return spec


def _lm_head(g: GraphBuilder, x: str, weight_vd: str, cfg: LlamaConfig):
    """logits [B, S, V] = x [B, S, D] @ W[V, D]^T via Gemm(transB) on the flattened rows."""
    rows = g.op("Reshape", [x, g.const([-1, cfg.dim])], name="/lm_head/rows/Reshape")
    y = g.op("Gemm", [rows, weight_vd], name="/lm_head/Gemm", transB=1)
    shape_bs = g.op("Shape", ["input_ids"], name="/lm_head/Shape")
    shape = g.op("Concat", [shape_bs, g.const([cfg.vocab_size])], name="/lm_head/shape/Concat", axis=0)
    g.op("Reshape", [y, shape], name="/lm_head/Reshape", outputs=["logits"])


def _rmsnorm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    """x / sqrt(mean(x^2) + eps) * w, in the exact pattern ORT fuses to SimplifiedLayerNormalization."""
    wname = g.weight(name.strip("/").replace("/", ".") + ".weight", weight)
    sq = g.op("Pow", [x, g.const(2.0, np.float32)], name=f"{name}/Pow")
    ms = g.op("ReduceMean", [sq, g.const([-1])], name=f"{name}/ReduceMean", keepdims=1)
    ms = g.op("Add", [ms, g.const(eps, np.float32)], name=f"{name}/Add")
    rms = g.op("Sqrt", [ms], name=f"{name}/Sqrt")
    y = g.op("Div", [x, rms], name=f"{name}/Div")
    return g.op("Mul", [y, wname], name=f"{name}/Mul")


def _attention_bias(g: GraphBuilder) -> str:
    """Additive bias [B, 1, S, T]: 0 where key j is visible to query i (j <= P + i and the key is a
    real token), a large negative number elsewhere. Computed once, shared by every layer."""
    n = "/model/attn_bias"
    s_len = g.op("Gather", [g.op("Shape", ["input_ids"], name=f"{n}/ids/Shape"), g.const(1)], name=f"{n}/S/Gather", axis=0)
    t_len = g.op("Gather", [g.op("Shape", ["attention_mask"], name=f"{n}/mask/Shape"), g.const(1)], name=f"{n}/T/Gather", axis=0)
    past = g.op("Sub", [t_len, s_len], name=f"{n}/P/Sub")
    kpos = g.op("Range", [g.const(0), t_len, g.const(1)], name=f"{n}/kpos/Range")  # [T]
    qpos = g.op("Range", [past, t_len, g.const(1)], name=f"{n}/qpos/Range")        # [S]
    kpos = g.op("Unsqueeze", [kpos, g.const([0])], name=f"{n}/kpos/Unsqueeze")     # [1, T]
    qpos = g.op("Unsqueeze", [qpos, g.const([1])], name=f"{n}/qpos/Unsqueeze")     # [S, 1]
    causal = g.op("LessOrEqual", [kpos, qpos], name=f"{n}/causal/LessOrEqual")      # [S, T]
    real = g.op("Cast", ["attention_mask"], name=f"{n}/real/Cast", to=9)           # bool [B, T]
    real = g.op("Unsqueeze", [real, g.const([1, 2])], name=f"{n}/real/Unsqueeze")   # [B, 1, 1, T]
    vis = g.op("And", [causal, real], name=f"{n}/And")                              # [B, 1, S, T]
    return g.op("Where", [vis, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32)],
                name=f"{n}/Where")

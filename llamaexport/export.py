"""Export: a checkpoint -> model.onnx + model.onnx.data with the KV cache in past/present form.

The graph is written directly (no tracing), one layer at a time: each layer's weights are
loaded, transposed/fused, quantized if asked, appended to the external data file and dropped
before the next layer, so peak memory is about one layer whatever the model size.

Graph (names follow DESIGN.md; node names are hierarchical for Netron):
  h = embed[input_ids]; cos/sin = tables[position_ids]; bias = causal & attention_mask
  per layer: x = RMSNorm(h); q,k,v = Split(x @ Wqkv); q,k = RoPE(q,k); present = past ++ k,v
             h += softmax(q k^T + bias) v @ Wo;  h += SwiGLU(RMSNorm(h) @ W13) @ W2
  logits = RMSNorm(h) @ W_out^T  (float32)

Precision lives in the graph, so TensorRT 11 (strongly typed), TensorRT 10 and ONNX Runtime
read the same file:
  fp32   everything float32
  fp16   fp16 weights, activations and KV cache; RMSNorm, softmax and logits in float32
  int8   int8 weights (per-channel DequantizeLinear -> MatMul), fp16 activations      [portable]
  int4   INT4 weights (block-wise DequantizeLinear -> MatMul), fp16 activations       [portable]
         (the most sensitive projections stay 8-bit: quantize.tensor_precision)
  w8a8   SmoothQuant: int8 weights; int8 activations (static per-tensor scale, Q/DQ) into
         QKV and gate/up, which TensorRT runs as INT8 GEMMs; fp16 elsewhere         [portable]
  int8/int4 on target "ort-cpu": MatMulNBits (block-wise, int8 compute), fp32 activations
With calibration text, int8/int4 fold AWQ scales, w8a8 folds SmoothQuant scales (awq.py), and
each quantized linear is rounded by input importance and gets a bias-correction term.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import LlamaExportError, custom_ops, quantize
from .checkpoint import Checkpoint
from .config import LlamaConfig, rope_tables
from .onnx_graph import GraphBuilder

OPSET = 21  # DequantizeLinear block_size / INT4 need 21; TensorRT 10.x and ORT parse it
PRECISIONS = ("fp32", "fp16", "int8", "int4", "w8a8")
TARGETS = ("portable", "ort-cpu")
ROLES = {"qkv": "qkv_proj", "o": "o_proj", "gate_up": "gate_up_proj", "down": "down_proj"}  # linear group -> role


def activation_dtype(precision: str, target: str) -> str:
    return "float32" if precision == "fp32" or target == "ort-cpu" else "float16"


def fused_attention(cfg: LlamaConfig, target: str) -> bool:
    """ONNX Runtime CPU graphs use GroupQueryAttention (full rotary only; partial rotary keeps the
    portable attention). Such a graph takes no left padding and may share its KV buffers."""
    return target == "ort-cpu" and cfg.rope_dim == cfg.head_dim


def lm_head_precision(precision: str, target: str, protect: bool = True) -> str | None:
    """The precision of ONNX Runtime CPU's quantized copy of the output layer (see _lm_head), or None
    (a float Gemm on the embedding table / output weight). int8 and int4 read an 8-bit copy; int4's
    compact recipe (protect=False) a 4-bit one, as onnxruntime-genai's int4 does."""
    if target != "ort-cpu" or precision not in ("int8", "int4"):
        return None
    return "int4" if precision == "int4" and not protect else "int8"


EMBED_BLOCK = 32


def quantized_embedding(precision: str, target: str, dim: int) -> bool:
    """ONNX Runtime CPU int8/int4 look tokens up in an 8-bit copy of the embedding table
    (GatherBlockQuantized, blocks of EMBED_BLOCK along the hidden dim): 9.25 bits per weight instead
    of 32 in memory (SmolLM2: 33 MB instead of 113; 7B: 150 MB instead of 524). Their output layer
    is a separate quantized copy (lm_head_precision), so a tied table is not needed in float."""
    return lm_head_precision(precision, target) is not None and dim % EMBED_BLOCK == 0


def last_logits_input(target: str) -> bool:
    """ONNX Runtime CPU graphs take an optional scalar `num_logits_to_keep` (default 0 = every
    position): the runtime asks for 1 when it only samples from the last position, so a prompt's
    prefill skips the output layer for all other positions (for SmolLM2 that layer is a fifth of
    the weights). Other runtimes (onnxruntime-genai) leave it out and get every position."""
    return target == "ort-cpu"


def io_spec(cfg: LlamaConfig, kv_dtype: str = "float32", target: str = "portable") -> dict:
    """The ONNX I/O contract (DESIGN.md) as data: name -> {dtype, shape}."""
    kv = ["batch", cfg.n_kv_heads, "past_seq", cfg.head_dim]
    inputs = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
        "attention_mask": {"dtype": "int64", "shape": ["batch", "total_seq"]},
        "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
    }
    if last_logits_input(target):
        inputs["num_logits_to_keep"] = {"dtype": "int64", "shape": [], "optional": True, "default": 0}
    outputs = {"logits": {"dtype": "float32", "shape": ["batch", "logits_seq" if last_logits_input(target) else "seq",
                                                      cfg.vocab_size]}}
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


class _Emitter:
    """Graph-building helpers bound to one precision / target."""

    def __init__(self, g: GraphBuilder, precision: str, target: str, block: int,
                 block8: int = quantize.CPU_8BIT_BLOCK):
        from onnx import TensorProto

        self.g, self.precision, self.target, self.block, self.block8 = g, precision, target, block, block8
        self.act = activation_dtype(precision, target)
        self.np_act = np.float16 if self.act == "float16" else np.float32
        self.onnx_act = TensorProto.FLOAT16 if self.act == "float16" else TensorProto.FLOAT
        self.TP = TensorProto

    def cast(self, x: str, to_float32: bool, name: str) -> str:
        """Cast between the activation dtype and float32 (no-op when they agree)."""
        if self.act == "float32":
            return x
        return self.g.op("Cast", [x], name=name, to=self.TP.FLOAT if to_float32 else self.onnx_act)

    def linear(self, x: str, w_t: np.ndarray, wname: str, name: str, *, precision: str | None = None,
               stats: dict | None = None, lm_head: bool = False) -> str:
        """x [..., K] @ w_t [K, N] in this precision's form. precision: this tensor's own (default:
        the model's). stats (calibration, see awq.input_stats): weighted rounding + bias correction.
        lm_head: the output layer (its CPU block, see quantize.cpu_block)."""
        g, K, N = self.g, *w_t.shape
        prec = precision or self.precision
        if prec in ("fp32", "fp16"):
            g.weight(wname, w_t.astype(self.np_act))
            return g.op("MatMul", [x, wname], name=f"{name}/MatMul")
        imp = None if stats is None else stats["imp"]
        hess = None if stats is None else stats.get("hessian")  # GPTQ rounding (quantize._gptq)
        if prec == "w8a8":  # int8 activations: a static per-tensor QuantizeLinear/DequantizeLinear pair
            sx = g.weight(wname + ".input_scale", np.array(max(stats["amax"], 1e-8) / 127.0, self.np_act))
            zx = g.weight(wname + ".input_zero_point", np.array(0, np.int8))
            xq = g.op("QuantizeLinear", [x, sx, zx], name=f"{name}/input/QuantizeLinear")
            x = g.op("DequantizeLinear", [xq, sx, zx], name=f"{name}/input/DequantizeLinear")
            prec = "int8"
        if self.target == "ort-cpu":
            block = quantize.cpu_block(prec, self.block, block8=self.block8, lm_head=lm_head)
            nbits, blob, scale, zp = quantize.cpu_matmul_nbits(w_t, precision=prec, block=block, imp=imp,
                                                               model_precision=self.precision, hessian=hess)
            bias = None
            if stats is not None:
                bias = self._bias_correction(
                    quantize.dequant_matmul_nbits(blob, scale, zp, K=K, N=N, bits=nbits, block=block), w_t, stats)
            g.use_domain("com.microsoft")
            ins = [g.weight(wname + ".qweight", blob), g.weight(wname + ".scales", scale),
                   "" if zp is None else g.weight(wname + ".zero_points", zp)]
            if bias is not None:
                ins += ["", g.weight(wname + ".bias", bias.astype(np.float32))]  # no g_idx
            while ins[-1] == "":
                ins.pop()
            return g.op("MatMulNBits", [x, *ins], name=f"{name}/MatMulNBits", domain="com.microsoft",
                        K=K, N=N, bits=nbits, block_size=block, accuracy_level=4)
        block = quantize.portable_int4_block(K, self.block) if prec == "int4" else None
        if block is not None:
            q, scale = (quantize.int4_blockwise(w_t, block, imp) if hess is None
                        else quantize.gptq_int4_blockwise(w_t, hess, block))
            g.weight_raw(wname + ".qweight", quantize.pack_int4(q), self.TP.INT4, [K, N])
            g.weight(wname + ".scales", scale.astype(self.np_act))
            w = g.op("DequantizeLinear", [wname + ".qweight", wname + ".scales"], name=f"{name}/DequantizeLinear",
                     axis=0, block_size=block)
            deq = None if stats is None else (q.reshape(K // block, block, N) * scale.astype(self.np_act)[:, None, :]
                                              .astype(np.float32)).reshape(K, N)
        else:  # int8, or int4 with K not divisible by any block size: per-channel int8
            q, scale = (quantize.int8_per_channel(w_t, imp) if hess is None
                        else quantize.gptq_int8_per_channel(w_t, hess))
            g.weight(wname + ".qweight", q)
            g.weight(wname + ".scales", scale.astype(self.np_act))
            w = g.op("DequantizeLinear", [wname + ".qweight", wname + ".scales"], name=f"{name}/DequantizeLinear", axis=1)
            deq = None if stats is None else q * scale.astype(self.np_act).astype(np.float32)
        y = g.op("MatMul", [x, w], name=f"{name}/MatMul")
        if deq is None:
            return y
        bias = g.weight(wname + ".bias", self._bias_correction(deq, w_t, stats).astype(self.np_act))
        return g.op("Add", [y, bias], name=f"{name}/bias/Add")

    @staticmethod
    def _bias_correction(deq: np.ndarray, w_t: np.ndarray, stats: dict) -> np.ndarray:
        """E[x] W - E[x_q] W_q: cancels the mean output error over the calibration inputs (Nagel
        et al. 2019's bias correction). x_q = x for the portable graph's weight-only linears; w8a8 and
        the CPU graph's MatMulNBits (int8 activation blocks, calibrated with AWQ) have the int8-rounded
        input's mean (stats["qmean"]), so the activation rounding's mean error is cancelled too."""
        mean = stats["mean"].astype(np.float64)
        qmean = stats.get("qmean", stats["mean"]).astype(np.float64)
        step = max(1, quantize.CHUNK_ELEMENTS // w_t.shape[0])  # float64 temporaries of ~128 MB at most
        return np.concatenate([mean @ w_t[:, i:i + step].astype(np.float64) - qmean @ deq[:, i:i + step].astype(np.float64)
                               for i in range(0, w_t.shape[1], step)])

    def add_norm(self, h: str, delta: str | None, weight: np.ndarray, eps: float, name: str) -> tuple[str, str]:
        """h' = h + delta; return (RMSNorm(h'), h'). ONNX Runtime CPU gets one fused
        SkipSimplifiedLayerNormalization node (its optimizer does not fuse the Add itself)."""
        if delta is None:
            return self.rmsnorm(h, weight, eps, name), h
        g = self.g
        if self.target == "ort-cpu" and self.act == "float32":
            g.use_domain("com.microsoft")
            wname = g.weight(name.strip("/").replace("/", ".") + ".weight", weight.astype(np.float32))
            y, _, _, s = g.op("SkipSimplifiedLayerNormalization", [delta, h, wname], name=f"{name}/SkipSimplifiedLayerNorm",
                              domain="com.microsoft", outputs=[f"{name}/output_0", "", "", f"{name}/residual"],
                              epsilon=float(eps))
            return y, s
        h = g.op("Add", [h, delta], name=f"{name}/residual/Add")
        return self.rmsnorm(h, weight, eps, name), h

    def rmsnorm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w in float32, in the exact pattern ORT fuses to
        SimplifiedLayerNormalization; cast in and out for fp16 activations."""
        g = self.g
        wname = g.weight(name.strip("/").replace("/", ".") + ".weight", weight.astype(np.float32))
        xf = self.cast(x, True, f"{name}/Cast_in")
        sq = g.op("Pow", [xf, g.const(2.0, np.float32)], name=f"{name}/Pow")
        ms = g.op("ReduceMean", [sq, g.const([-1])], name=f"{name}/ReduceMean", keepdims=1)
        ms = g.op("Add", [ms, g.const(eps, np.float32)], name=f"{name}/Add")
        rms = g.op("Sqrt", [ms], name=f"{name}/Sqrt")
        y = g.op("Div", [xf, rms], name=f"{name}/Div")
        y = g.op("Mul", [y, wname], name=f"{name}/Mul")
        return self.cast(y, False, f"{name}/Cast_out")


def export_onnx(ckpt: Checkpoint, out_dir, *, precision: str = "fp32", target: str = "portable",
                block_size: int | None = None, calibration: np.ndarray | None = None, progress: bool = True,
                int4_protect: bool = True, gptq: bool = False) -> dict:
    """Write `out_dir/model.onnx` and `out_dir/model.onnx.data`; return the I/O spec.

    calibration: token ids [n_seq, seq_len]; with int8/int4 this turns on AWQ (see awq.py), and
    with gptq the weights are then rounded by GPTQ (quantize._gptq) instead of importance-weighted
    round-to-nearest.
    int4_protect: int4 keeps the sensitive projections at 8 bits (quantize.tensor_precision) and an
    8-bit output layer; False is the compact recipe (every linear and the output layer 4-bit).
    block_size: every quantized tensor's block; None: each recipe's defaults (quantize.resolve_blocks)."""
    from onnx import TensorProto

    if precision not in PRECISIONS:
        raise LlamaExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        raise LlamaExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    if precision == "w8a8" and (target != "portable" or calibration is None):
        raise LlamaExportError("w8a8 (SmoothQuant) is for TensorRT profiles and needs calibration text")
    if block_size is not None and block_size not in quantize.BLOCK_SIZES:
        raise LlamaExportError(f"block size {block_size} must be a power of two from 16 to 256")
    block_size, block_size_8bit = quantize.resolve_blocks(precision, int4_protect, target, block_size)
    cfg, W = ckpt.config, ckpt.weights
    out_dir = Path(out_dir)
    g = GraphBuilder(out_dir / "model.onnx.data", opset=OPSET)
    e = _Emitter(g, precision, target, block_size, block_size_8bit)
    hd = cfg.head_dim

    g.use_domain(custom_ops.DOMAIN)
    g.add_function(custom_ops.rope_function(head_dim=hd, rotary_dim=cfg.rope_dim, interleaved=True))
    g.add_function(custom_ops.swiglu_function())

    spec = io_spec(cfg, e.act, target)
    for name, s in spec["inputs"].items():
        if s.get("optional"):
            g.input_with_default(name, s["default"])
        else:
            g.input(name, TensorProto.INT64 if s["dtype"] == "int64" else e.onnx_act, s["shape"])

    # ---- shared prologue: embeddings, rotary tables, attention bias
    emb = W["tok_embeddings.weight"]  # [V, D]
    if quantized_embedding(precision, target, cfg.dim):
        blob, scale, zp = quantize.matmul_nbits(emb.T, bits=8, block=EMBED_BLOCK)  # MatMulNBits' layout, one row per token
        V, nb = cfg.vocab_size, cfg.dim // EMBED_BLOCK
        g.use_domain("com.microsoft")
        ins = [g.weight("model.embed_tokens.qweight", blob.reshape(V, cfg.dim)), "input_ids",
               g.weight("model.embed_tokens.scales", scale.reshape(V, nb)),
               g.weight("model.embed_tokens.zero_points", zp.reshape(V, nb))]
        h = g.op("GatherBlockQuantized", ins, name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
                 gather_axis=0, quantize_axis=1, block_size=EMBED_BLOCK, bits=8)
        del blob, scale, zp
    else:
        g.weight("model.embed_tokens.weight", emb.astype(e.np_act))
        h = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], name="/model/embed_tokens/Gather")
    cos, sin = rope_tables(cfg)
    g.weight("model.rotary.cos_cache", cos.astype(e.np_act))
    g.weight("model.rotary.sin_cache", sin.astype(e.np_act))
    gqa = _gqa_inputs(g) if fused_attention(cfg, target) else None
    if gqa is not None:
        g.use_domain("com.microsoft")
        cos = sin = bias = None
    else:
        cos = g.op("Gather", ["model.rotary.cos_cache", "position_ids"], name="/model/rotary/cos/Gather")  # [B, S, rd/2]
        sin = g.op("Gather", ["model.rotary.sin_cache", "position_ids"], name="/model/rotary/sin/Gather")
        bias = _attention_bias(g)
    rope_attrs = dict(domain=custom_ops.DOMAIN, interleaved=1, rotary_dim=cfg.rope_dim, **custom_ops.plugin_attrs())

    awq = calibration is not None and precision in ("int8", "int4")
    smooth = precision == "w8a8"
    if awq or smooth:
        from .awq import LayerwiseCalibrator, apply_awq, apply_smoothquant

        calib = LayerwiseCalibrator(cfg, calibration, emb)

        def fq_w8(w_t, imp):
            return quantize.fake_quant(w_t, precision="int8", target=target, block=block_size, block8=block_size_8bit,
                                       imp=imp, model_precision=precision)

        def fq(w_t, imp, group):
            return quantize.fake_quant(w_t, precision=quantize.tensor_precision(precision, ROLES[group], target, int4_protect),
                                       target=target, block=block_size, block8=block_size_8bit, imp=imp,
                                       model_precision=precision)

        def aq(x, group):  # MatMulNBits' int8 activations, blocked as the group's weights (quantize.cpu_block)
            prec = quantize.tensor_precision(precision, ROLES[group], target, int4_protect)
            return quantize.fake_quant_act_blocks(x, quantize.cpu_block(prec, block_size, block8=block_size_8bit))
    del emb
    w8a8_groups = [grp for grp, r in ROLES.items() if quantize.tensor_precision(precision, r, target) == "w8a8"]
    bar = _progress(cfg.n_layers, "export+awq" if awq else "export+smoothquant" if smooth else "export", progress)
    delta = None  # a layer output not yet added to the residual stream h
    for i in range(cfg.n_layers):
        p, pre, wp = f"layers.{i}.", f"/model/layers.{i}", f"model.layers.{i}"
        lw = {k[len(p):]: W[k] for k in W.shapes if k.startswith(p)}  # this layer, loaded once
        st = {}
        if awq:
            lw, st = apply_awq(cfg, lw, calib.layer(lw), fq, hessian=gptq,
                               act_quant=aq if target == "ort-cpu" else None)
        elif smooth:
            lw, st = apply_smoothquant(cfg, lw, calib.layer(lw), fq_w8, groups=w8a8_groups)

        def lin(x, w_t, group):
            role = ROLES[group]
            block = "attn" if group in ("qkv", "o") else "mlp"
            return e.linear(x, w_t, f"{wp}.{block}.{role}.weight", f"{pre}/{block}/{role}",
                            precision=quantize.tensor_precision(precision, role, target, int4_protect), stats=st.pop(group, None))
        x, h = e.add_norm(h, delta, lw["attention_norm.weight"], cfg.norm_eps, f"{pre}/input_layernorm")
        # fused QKV; the 1/sqrt(hd) softmax scale is folded into the q rows (exact for hd = 64)
        wq = lw["attention.wq.weight"] * np.float32(hd ** -0.5)
        wqkv = np.concatenate([wq, lw["attention.wk.weight"], lw["attention.wv.weight"]]).T
        del wq
        qkv = lin(x, wqkv, "qkv")
        del wqkv
        if gqa is not None:
            o = _attention_gqa(g, qkv, i, cfg, gqa, pre)
        else:
            o = _attention_standard(g, e, qkv, i, cfg, cos, sin, bias, rope_attrs, pre)
        o = lin(o, lw["attention.wo.weight"].T, "o")
        x, h = e.add_norm(h, o, lw["ffn_norm.weight"], cfg.norm_eps, f"{pre}/post_attention_layernorm")
        w13 = np.concatenate([lw["feed_forward.w1.weight"], lw["feed_forward.w3.weight"]]).T
        gu = lin(x, w13, "gate_up")
        del w13
        a = g.op("SwiGLU", [gu], name=f"{pre}/mlp/act/SwiGLU", domain=custom_ops.DOMAIN, **custom_ops.plugin_attrs())
        d = lin(a, lw["feed_forward.w2.weight"].T, "down")
        delta = d  # added to the residual stream by the next norm
        if bar:
            bar.update(1)
    if bar:
        bar.close()

    head_prec = lm_head_precision(precision, target, int4_protect)
    head_stats, norm_w = None, W["norm.weight"]
    if (awq or smooth) and head_prec is not None:  # the output layer's input: the final norm of the calibration text
        from .awq import input_stats

        hs = calib.h.numpy().reshape(-1, cfg.dim).astype(np.float64)
        xn = (hs / np.sqrt((hs ** 2).mean(axis=1, keepdims=True) + cfg.norm_eps) * norm_w).astype(np.float32)
        del hs
        def head_aq(v):  # the output layer's kernel rounds its input too (see aq)
            return quantize.fake_quant_act_blocks(v, quantize.cpu_block(head_prec, block_size, lm_head=True))

        head_stats = input_stats(xn, hessian=gptq and awq, act_quant=head_aq if target == "ort-cpu" and awq else None)
        del xn
    x, _ = e.add_norm(h, delta, norm_w, cfg.norm_eps, "/model/norm")
    if last_logits_input(target):  # x[:, -n:] (n = 0: every position)
        n = g.op("Neg", [g.op("Reshape", ["num_logits_to_keep", g.const([1])], name="/lm_head/keep/Reshape")],
                 name="/lm_head/keep/Neg")
        x = g.op("Slice", [x, n, g.const([np.iinfo(np.int64).max]), g.const([1])], name="/lm_head/keep/Slice")
    _lm_head(g, e, x, W, cfg, head_prec, head_stats)
    for name, s in spec["outputs"].items():
        g.output(name, TensorProto.FLOAT if s["dtype"] == "float32" else e.onnx_act, s["shape"])
    g.save(out_dir / "model.onnx", producer="llamaexport",
           doc=f"LLaMA {cfg.n_layers} layers, dim {cfg.dim}, {precision} ({target})")
    return spec


def _attention_standard(g: GraphBuilder, e: _Emitter, qkv: str, i: int, cfg: LlamaConfig, cos: str, sin: str,
                        bias: str, rope_attrs: dict, pre: str) -> str:
    """Portable attention: our RoPE op, past ++ new K/V (the present outputs), softmax with the
    shared mask bias. Returns the attention output [B, S, H*hd] before o_proj."""
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = g.op("Split", [qkv, g.const([H * hd, K * hd, K * hd])], name=f"{pre}/attn/qkv/Split", n_out=3, axis=-1)
    heads = {}
    for nm, t, n in (("q", q, H), ("k", k, K), ("v", v, K)):
        t = g.op("Reshape", [t, g.const([0, 0, n, hd])], name=f"{pre}/attn/{nm}/Reshape")
        heads[nm] = g.op("Transpose", [t], name=f"{pre}/attn/{nm}/Transpose", perm=[0, 2, 1, 3])  # [B, n, S, hd]
    q = g.op("RoPE", [heads["q"], cos, sin], name=f"{pre}/attn/q_rope/RoPE", **rope_attrs)
    k = g.op("RoPE", [heads["k"], cos, sin], name=f"{pre}/attn/k_rope/RoPE", **rope_attrs)
    pk = g.op("Concat", [f"past_key_values.{i}.key", k], name=f"{pre}/attn/k_cache/Concat",
              outputs=[f"present.{i}.key"], axis=2)  # [B, K, T, hd]
    pv = g.op("Concat", [f"past_key_values.{i}.value", heads["v"]], name=f"{pre}/attn/v_cache/Concat",
              outputs=[f"present.{i}.value"], axis=2)
    # grouped-query attention without copying K/V: view q as [B, K, rep*S, hd]
    qg = g.op("Reshape", [q, g.const([0, K, -1, hd])], name=f"{pre}/attn/q_group/Reshape")
    kt = g.op("Transpose", [pk], name=f"{pre}/attn/k/TransposeT", perm=[0, 1, 3, 2])
    s = g.op("MatMul", [qg, kt], name=f"{pre}/attn/qk/MatMul")  # [B, K, rep*S, T]
    s = g.op("Reshape", [s, g.const([0, H, -1, 0])], name=f"{pre}/attn/scores/Reshape")  # [B, H, S, T]
    s = e.cast(s, True, f"{pre}/attn/scores/Cast")
    s = g.op("Add", [s, bias], name=f"{pre}/attn/mask/Add")
    s = g.op("Softmax", [s], name=f"{pre}/attn/Softmax", axis=-1)
    s = e.cast(s, False, f"{pre}/attn/probs/Cast")
    s = g.op("Reshape", [s, g.const([0, K, -1, 0])], name=f"{pre}/attn/probs/Reshape")
    o = g.op("MatMul", [s, pv], name=f"{pre}/attn/pv/MatMul")  # [B, K, rep*S, hd]
    o = g.op("Reshape", [o, g.const([0, H, -1, hd])], name=f"{pre}/attn/o/Reshape")
    o = g.op("Transpose", [o], name=f"{pre}/attn/o/Transpose", perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.const([0, 0, H * hd])], name=f"{pre}/attn/o/Merge")
    return o


def _gqa_inputs(g: GraphBuilder) -> tuple[str, str]:
    """seqlens_k [B] = real tokens - 1 and total_sequence_length (scalar), both int32, as
    GroupQueryAttention wants them; computed once from attention_mask."""
    n = "/model/gqa"
    real = g.op("ReduceSum", ["attention_mask", g.const([1])], name=f"{n}/ReduceSum", keepdims=0)
    seqlens = g.op("Sub", [real, g.const(1)], name=f"{n}/Sub")
    seqlens = g.op("Cast", [seqlens], name=f"{n}/seqlens/Cast", to=6)
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], name=f"{n}/Shape"), g.const(1)], name=f"{n}/Gather", axis=0)
    total = g.op("Cast", [total], name=f"{n}/total/Cast", to=6)
    return seqlens, total


def _attention_gqa(g: GraphBuilder, qkv: str, i: int, cfg: LlamaConfig, gqa: tuple, pre: str) -> str:
    """ONNX Runtime CPU: one com.microsoft.GroupQueryAttention node on the packed QKV, with the
    rotary embedding (interleaved, from the cos/sin caches) applied inside. The 1/sqrt(hd) scale
    is already folded into the q rows, hence scale=1."""
    seqlens, total = gqa
    o, _, _ = g.op("GroupQueryAttention",
                   [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
                    "model.rotary.cos_cache", "model.rotary.sin_cache"],
                   name=f"{pre}/attn/GroupQueryAttention", domain="com.microsoft",
                   outputs=[f"{pre}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
                   num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, do_rotary=1, rotary_interleaved=1,
                   scale=1.0)
    return o


def _lm_head(g: GraphBuilder, e: _Emitter, x: str, W, cfg: LlamaConfig, precision: str | None, stats: dict | None):
    """logits [B, S, V] float32.

    Default (precision None): Gemm(transB) on the [V, D] table in the activation dtype, so a tied
    embedding is stored once. ort-cpu int8/int4: a MatMulNBits copy (lm_head_precision): an 8-bit
    one reads a quarter of the fp32 bytes per token (for SmolLM2 the fp32 head alone is half of an
    int8 model's bytes per token). The output layer is sensitive: on SmolLM2 a 4-bit copy adds
    ~0.05 to the mean KL, which only int4's compact recipe accepts. With calibration text, the
    rounding is weighted by and the bias corrected for the final norm's output (stats). (An AWQ
    scale folded into the final norm moved SmolLM2's compact KL only from 0.131 to 0.128.)"""
    if precision is not None:
        w = W["tok_embeddings.weight"] if cfg.tie_embeddings else W["output.weight"]
        y = e.linear(x, w.T, "lm_head.weight", "/lm_head", precision=precision, stats=stats, lm_head=True)
        g.op("Identity", [y], name="/lm_head/Identity", outputs=["logits"])
        return
    if cfg.tie_embeddings:
        weight = "model.embed_tokens.weight"
    else:
        weight = g.weight("lm_head.weight", W["output.weight"].astype(e.np_act))
    rows = g.op("Reshape", [x, g.const([-1, cfg.dim])], name="/lm_head/rows/Reshape")
    y = g.op("Gemm", [rows, weight], name="/lm_head/Gemm", transB=1)
    shape_bs = g.op("Shape", [x], name="/lm_head/Shape", start=0, end=2)
    shape = g.op("Concat", [shape_bs, g.const([cfg.vocab_size])], name="/lm_head/shape/Concat", axis=0)
    if e.act == "float32":
        g.op("Reshape", [y, shape], name="/lm_head/Reshape", outputs=["logits"])
    else:
        y = g.op("Reshape", [y, shape], name="/lm_head/Reshape")
        g.op("Cast", [y], name="/lm_head/Cast", outputs=["logits"], to=e.TP.FLOAT)


def _attention_bias(g: GraphBuilder) -> str:
    """Additive bias [B, 1, S, T] float32: 0 where key j is visible to query i (j <= P + i and
    the key is a real token), a large negative number elsewhere. Computed once for all layers."""
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

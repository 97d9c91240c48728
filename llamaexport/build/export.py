"""Export: a checkpoint -> model.onnx + model.onnx.data with the KV cache in past/present form.

The graph is written directly (no tracing), one layer at a time: each layer's weights are
loaded, transposed/fused, quantized if asked, appended to the external data file and dropped
before the next layer, so peak memory is about one layer whatever the model size.

Graph (names follow DESIGN.md; node names are hierarchical for Netron):
  h = embed[input_ids]; cos/sin = tables[position_ids]; bias = causal & attention_mask
  per layer: x = RMSNorm(h); q,k,v = Split(x @ Wqkv); q,k = RoPE(q,k); present = past ++ k,v
             h += softmax(q k^T + bias) v @ Wo;  h += SwiGLU(RMSNorm(h) @ W13) @ W2
  logits = RMSNorm(h[:, -num_logits_to_keep:]) @ W_out^T  (float32; num_logits_to_keep 0 = every position)

The cache and attention take one of three forms (model.kv_form.KVForm and recipe.Recipe.kv_form; the
manifest's `kv_cache` and `graph`):
  CPU graph       GroupQueryAttention (com.microsoft) on a max-length buffer it writes in place
  portable concat present = Concat(past, new); MatMul -> Add(bias) -> Softmax -> MatMul in the
                  activation dtype (the pattern TensorRT fuses into one MHA kernel; no float32 scores)
  portable inplace a max-length buffer updated by TensorScatter (-> TensorRT's IKVCacheUpdateLayer),
                  the ONNX Attention op (-> IAttention) on its first T = attention_mask's width positions

Precision lives in the graph, so TensorRT 11 (strongly typed), TensorRT 10 and ONNX Runtime
read the same file:
  fp32   everything float32
  fp16   fp16 weights, activations and KV cache; RMSNorm, softmax and logits in float32
  int8   int8 weights (per-channel DequantizeLinear -> MatMul), fp16 activations      [portable]
  int4   INT4 weights (block-wise DequantizeLinear -> MatMul), fp16 activations       [portable]
         (the most sensitive projections stay 8-bit: Recipe.tensor_precision)
  w8a8   SmoothQuant: int8 weights; int8 activations (static per-tensor scale, Q/DQ) into
         QKV and gate/up, which TensorRT runs as INT8 GEMMs; fp16 elsewhere         [portable]
  int8/int4 on target "ort-cpu": MatMulNBits (block-wise, int8 compute), fp32 activations
Which form each tensor gets is the Recipe's answer (recipe.py); this module only writes it.
With calibration text, int8/int4 fold AWQ scales, w8a8 folds SmoothQuant scales (awq.py), and
each quantized linear is rounded by input importance and gets a bias-correction term.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError
from llamaexport.build import custom_ops, quantize
from llamaexport.build.onnx_graph import GraphBuilder
from llamaexport.build.recipe import EMBED_BLOCK, LM_HEAD, ROLES, Precision, Recipe
from llamaexport.model.checkpoint import Checkpoint
from llamaexport.model.config import LlamaConfig, rope_tables

ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (per block of K) and int8 dot products
# The additive attention mask's "hidden" value. float16: -1e4, not the dtype's minimum: a score below
# -16 plus -65504 rounds to -inf, and a query that sees no key at all (a left-padded prompt's padding
# rows) would then give NaN, which reaches the real rows through the padding's K/V. exp(-1e4) is 0.
MASK_VALUE = {"float32": float(np.finfo(np.float32).min), "float16": -1e4}


def io_spec(cfg: LlamaConfig, recipe: Recipe) -> dict:
    """The ONNX I/O contract (DESIGN.md) as data: name -> {dtype, shape}. The in-place cache is a
    static max_seq_len (TensorRT's KV-cache update needs a static sequence dimension)."""
    kv_dtype = recipe.activation_dtype
    past = ["batch", cfg.n_kv_heads, cfg.max_seq_len if recipe.inplace_kv else "past_seq", cfg.head_dim]
    present = past if recipe.inplace_kv else past[:2] + ["total_seq", past[3]]
    keep = {"dtype": "int64", "shape": []}
    if recipe.logits_keep_optional:
        keep.update(optional=True, default=0)
    inputs = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
        "attention_mask": {"dtype": "int64", "shape": ["batch", "total_seq"]},
        "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
        "num_logits_to_keep": keep,
    }
    outputs = {"logits": {"dtype": "float32", "shape": ["batch", "logits_seq", cfg.vocab_size]}}
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = {"dtype": kv_dtype, "shape": past}
            outputs[f"present.{i}.{kind}"] = {"dtype": kv_dtype, "shape": present}
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
    """Graph-building helpers bound to one recipe."""

    def __init__(self, g: GraphBuilder, recipe: Recipe):
        from onnx import TensorProto

        self.g, self.recipe = g, recipe
        self.act = recipe.activation_dtype
        self.np_act = np.float16 if self.act == "float16" else np.float32
        self.onnx_act = TensorProto.FLOAT16 if self.act == "float16" else TensorProto.FLOAT
        self.TP = TensorProto

    def cast(self, x: str, to_float32: bool, name: str) -> str:
        """Cast between the activation dtype and float32 (no-op when they agree)."""
        if self.act == "float32":
            return x
        return self.g.op("Cast", [x], name=name, to=self.TP.FLOAT if to_float32 else self.onnx_act)

    def linear(self, x: str, w_t: np.ndarray, *, wname: str, name: str, role: str, stats: dict | None = None) -> str:
        """x [..., K] @ w_t [K, N] in the form the recipe gives this role (qkv_proj, ..., lm_head).
        stats (calibration, see awq.input_stats): weighted rounding + bias correction."""
        g, K, N = self.g, *w_t.shape
        form = self.recipe.form(role)
        if form is None:
            g.weight(wname, w_t.astype(self.np_act))
            return g.op("MatMul", [x, wname], name=f"{name}/MatMul")
        hess = None if stats is None else stats.get("hessian")  # GPTQ rounding (quantize._gptq)
        damp = quantize.DAMP if stats is None else stats.get("damp", quantize.DAMP)
        if self.recipe.quantized_input(role):  # w8a8: a static per-tensor QuantizeLinear/DequantizeLinear pair
            sx = g.weight(wname + ".input_scale", np.array(quantize.activation_scale(stats["amax"]), self.np_act))
            zx = g.weight(wname + ".input_zero_point", np.array(0, np.int8))
            xq = g.op("QuantizeLinear", [x, sx, zx], name=f"{name}/input/QuantizeLinear")
            x = g.op("DequantizeLinear", [xq, sx, zx], name=f"{name}/input/DequantizeLinear")
        if form.nbits:
            return self._matmul_nbits(x, w_t, wname=wname, name=name, form=form, stats=stats, hess=hess, damp=damp)
        imp = None if stats is None else stats["imp"]
        q, scale, block = quantize.portable_tensors(w_t, form, imp=imp, hessian=hess, damp=damp)
        if block is not None:  # INT4, block-wise along K
            g.weight_raw(wname + ".qweight", quantize.pack_int4(q), self.TP.INT4, [K, N])
            g.weight(wname + ".scales", scale.astype(self.np_act))
            w = g.op("DequantizeLinear", [wname + ".qweight", wname + ".scales"], name=f"{name}/DequantizeLinear",
                     axis=0, block_size=block)
            deq = None if stats is None else (q.reshape(K // block, block, N) * scale.astype(self.np_act)[:, None, :]
                                              .astype(np.float32)).reshape(K, N)
        else:  # int8 per output channel (also int4 whose K no block divides)
            g.weight(wname + ".qweight", q)
            g.weight(wname + ".scales", scale.astype(self.np_act))
            w = g.op("DequantizeLinear", [wname + ".qweight", wname + ".scales"], name=f"{name}/DequantizeLinear", axis=1)
            deq = None if stats is None else q * scale.astype(self.np_act).astype(np.float32)
        y = g.op("MatMul", [x, w], name=f"{name}/MatMul")
        if deq is None:
            return y
        bias = g.weight(wname + ".bias", self._bias_correction(deq, w_t, stats).astype(self.np_act))
        return g.op("Add", [y, bias], name=f"{name}/bias/Add")

    def _matmul_nbits(self, x: str, w_t: np.ndarray, *, wname: str, name: str, form, stats, hess, damp) -> str:
        """ONNX Runtime CPU: one com.microsoft.MatMulNBits node (bias correction as its bias input)."""
        g, K, N = self.g, *w_t.shape
        imp = None if stats is None else stats["imp"]
        blob, scale, zp = quantize.nbits_tensors(w_t, form, imp=imp, hessian=hess, damp=damp)
        bias = None
        if stats is not None:
            deq = quantize.dequant_matmul_nbits(blob, scale, zp, K=K, N=N, bits=form.bits, block=form.block)
            bias = self._bias_correction(deq, w_t, stats)
        g.use_domain("com.microsoft")
        ins = [g.weight(wname + ".qweight", blob), g.weight(wname + ".scales", scale),
               "" if zp is None else g.weight(wname + ".zero_points", zp)]
        if bias is not None:
            ins += ["", g.weight(wname + ".bias", bias.astype(np.float32))]  # no g_idx
        while ins[-1] == "":
            ins.pop()
        return g.op("MatMulNBits", [x, *ins], name=f"{name}/MatMulNBits", domain="com.microsoft",
                    K=K, N=N, bits=form.bits, block_size=form.block, accuracy_level=ACCURACY_LEVEL)

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

    def add_norm(self, h: str, delta: str | None, weight: np.ndarray, *, eps: float, name: str) -> tuple[str, str]:
        """h' = h + delta; return (RMSNorm(h'), h'). ONNX Runtime CPU gets one fused
        SkipSimplifiedLayerNormalization node (its optimizer does not fuse the Add itself)."""
        if delta is None:
            return self.rmsnorm(h, weight, eps=eps, name=name), h
        g = self.g
        if self.recipe.cpu and self.act == "float32":
            g.use_domain("com.microsoft")
            wname = g.weight(name.strip("/").replace("/", ".") + ".weight", weight.astype(np.float32))
            y, _, _, s = g.op("SkipSimplifiedLayerNormalization", [delta, h, wname], name=f"{name}/SkipSimplifiedLayerNorm",
                              domain="com.microsoft", outputs=[f"{name}/output_0", "", "", f"{name}/residual"],
                              epsilon=float(eps))
            return y, s
        h = g.op("Add", [h, delta], name=f"{name}/residual/Add")
        return self.rmsnorm(h, weight, eps=eps, name=name), h

    def rmsnorm(self, x: str, weight: np.ndarray, *, eps: float, name: str) -> str:
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


class _Calibration:
    """The calibration text's part in the export: AWQ (int8/int4) or SmoothQuant (w8a8) scales
    searched and folded per layer (awq.py), and the statistics each quantized linear is rounded
    and bias-corrected with, the output layer's included."""

    def __init__(self, recipe: Recipe, cfg: LlamaConfig, ids: np.ndarray, embedding: np.ndarray):
        from llamaexport.build.awq import LayerwiseCalibrator

        self.recipe, self.cfg = recipe, cfg
        self.calibrator = LayerwiseCalibrator(cfg, ids, embedding)
        self.smooth = recipe.precision is Precision.W8A8
        self.w8a8_groups = [grp for grp, role in ROLES.items() if recipe.quantized_input(role)]

    def fake_quant(self, w_t: np.ndarray, imp: np.ndarray, group: str) -> np.ndarray:
        return quantize.fake_quant(w_t, self.recipe.form(ROLES[group]), imp=imp)

    def act_quant(self, x: np.ndarray, group: str) -> np.ndarray:
        """What the CPU graph's MatMulNBits multiplies instead of x: int8 blocks as the group's weights'."""
        return quantize.fake_quant_act_blocks(x, self.recipe.form(ROLES[group]).block)

    def layer(self, lw: dict) -> tuple[dict, dict]:
        """This layer's weights with the scales folded, and each linear group's input statistics."""
        from llamaexport.build.awq import apply_awq, apply_smoothquant

        acts = self.calibrator.layer(lw)
        if self.smooth:
            return apply_smoothquant(self.cfg, lw, acts, self.fake_quant, groups=self.w8a8_groups)
        return apply_awq(self.cfg, lw, acts, self.fake_quant, hessian=self.recipe.quant_method == "gptq",
                         act_quant=self.act_quant if self.recipe.cpu else None)

    def lm_head_stats(self, norm_w: np.ndarray) -> dict | None:
        """The output layer's input statistics (the final norm of the calibration text), when the
        recipe quantizes the output layer."""
        from llamaexport.build.awq import input_stats

        form = self.recipe.form(LM_HEAD)
        if form is None:
            return None
        xn = self.calibrator.final_norm(norm_w)
        awq = not self.smooth
        act_quant = (lambda v: quantize.fake_quant_act_blocks(v, form.block)) if self.recipe.cpu and awq else None
        return input_stats(xn, hessian=awq and self.recipe.quant_method == "gptq", act_quant=act_quant)


def export_onnx(ckpt: Checkpoint, out_dir, recipe: Recipe, *, calibration: np.ndarray | None = None,
                progress: bool = True) -> dict:
    """Write `out_dir/model.onnx` and `out_dir/model.onnx.data` in the recipe's form; return the
    I/O spec. calibration: token ids [n_seq, seq_len], required when the recipe calibrates (AWQ,
    GPTQ, SmoothQuant: awq.calibration_ids)."""
    from onnx import TensorProto

    if recipe.calibrated and calibration is None:
        raise LlamaExportError(f"{recipe.quantization} needs calibration ids; pass calibration= (awq.calibration_ids)")
    cfg, W = ckpt.config, ckpt.weights
    out_dir = Path(out_dir)
    g = GraphBuilder(out_dir / "model.onnx.data", opset=recipe.opset)
    e = _Emitter(g, recipe)
    g.use_domain(custom_ops.DOMAIN)
    g.add_function(custom_ops.rope_function(head_dim=cfg.head_dim, rotary_dim=cfg.rope_dim, interleaved=True,
                                            opset=recipe.opset))
    g.add_function(custom_ops.swiglu_function(opset=recipe.opset))
    spec = io_spec(cfg, recipe)
    for name, s in spec["inputs"].items():
        if s.get("optional"):
            g.input_with_default(name, s["default"])
        else:
            g.input(name, TensorProto.INT64 if s["dtype"] == "int64" else e.onnx_act, s["shape"])

    emb = W["tok_embeddings.weight"]  # [V, D]
    h = _embedding(g, e, emb, cfg)
    attn = _attention_inputs(g, e, cfg)
    calib = _Calibration(recipe, cfg, calibration, emb) if recipe.calibrated else None
    del emb
    desc = "export" if calib is None else "export+smoothquant" if calib.smooth else "export+awq"
    bar = _progress(cfg.n_layers, desc, progress)
    delta = None  # a layer output not yet added to the residual stream h
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        lw = {k[len(p):]: W[k] for k in W.shapes if k.startswith(p)}  # this layer, loaded once
        lw, stats = calib.layer(lw) if calib else (lw, {})
        h, delta = _layer(g, e, i, cfg, lw=lw, stats=stats, attn=attn, h=h, delta=delta)
        if bar:
            bar.update(1)
    if bar:
        bar.close()

    norm_w = W["norm.weight"]
    head_stats = calib.lm_head_stats(norm_w) if calib else None
    x, _ = e.add_norm(h, delta, norm_w, eps=cfg.norm_eps, name="/model/norm")
    # x[:, -n:] (n = 0: every position); on TensorRT n is a shape tensor (tensorrt.builder gives its profile values)
    n = g.op("Neg", [g.op("Reshape", ["num_logits_to_keep", g.const([1])], name="/lm_head/keep/Reshape")],
             name="/lm_head/keep/Neg")
    x = g.op("Slice", [x, n, g.const([np.iinfo(np.int64).max]), g.const([1])], name="/lm_head/keep/Slice")
    _lm_head(g, e, x, W, cfg, head_stats)
    for name, s in spec["outputs"].items():
        g.output(name, TensorProto.FLOAT if s["dtype"] == "float32" else e.onnx_act, s["shape"])
    g.save(out_dir / "model.onnx", producer="llamaexport",
           doc=f"LLaMA {cfg.n_layers} layers, dim {cfg.dim}, {recipe.precision} ({recipe.target})")
    return spec


def _embedding(g: GraphBuilder, e: _Emitter, emb: np.ndarray, cfg: LlamaConfig) -> str:
    """h [B, S, D] = the embedding rows of input_ids: a float Gather, or on the CPU int8/int4 graphs a
    GatherBlockQuantized over an 8-bit copy (blocks of EMBED_BLOCK along D; the output layer is a
    separate quantized copy, so a tied table need not stay in float)."""
    if not e.recipe.quantized_embedding(cfg.dim):
        g.weight("model.embed_tokens.weight", emb.astype(e.np_act))
        return g.op("Gather", ["model.embed_tokens.weight", "input_ids"], name="/model/embed_tokens/Gather")
    blob, scale, zp = quantize.matmul_nbits(emb.T, bits=8, block=EMBED_BLOCK)  # MatMulNBits' layout, one row per token
    V, nb = cfg.vocab_size, cfg.dim // EMBED_BLOCK
    g.use_domain("com.microsoft")
    ins = [g.weight("model.embed_tokens.qweight", blob.reshape(V, cfg.dim)), "input_ids",
           g.weight("model.embed_tokens.scales", scale.reshape(V, nb)),
           g.weight("model.embed_tokens.zero_points", zp.reshape(V, nb))]
    return g.op("GatherBlockQuantized", ins, name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
                gather_axis=0, quantize_axis=1, block_size=EMBED_BLOCK, bits=8)


def _attention_inputs(g: GraphBuilder, e: _Emitter, cfg: LlamaConfig) -> dict:
    """What every layer's attention shares, computed once: the rotary tables, and either
    GroupQueryAttention's sequence lengths (CPU graph) or the gathered cos/sin and the mask bias."""
    cos, sin = rope_tables(cfg)
    g.weight("model.rotary.cos_cache", cos.astype(e.np_act))
    g.weight("model.rotary.sin_cache", sin.astype(e.np_act))
    if e.recipe.fused_attention(cfg):
        gqa = _gqa_inputs(g)
        g.use_domain("com.microsoft")
        return {"gqa": gqa}
    out = {"gqa": None,
           "cos": g.op("Gather", ["model.rotary.cos_cache", "position_ids"], name="/model/rotary/cos/Gather"),  # [B, S, rd/2]
           "sin": g.op("Gather", ["model.rotary.sin_cache", "position_ids"], name="/model/rotary/sin/Gather"),
           "rope_attrs": dict(domain=custom_ops.DOMAIN, interleaved=1, rotary_dim=cfg.rope_dim, **custom_ops.plugin_attrs())}
    if e.recipe.inplace_kv:
        out.update(_inplace_inputs(g, e))
    else:
        out["bias"] = _attention_bias(g, e, rep=cfg.n_rep)
    return out


def _linear(e: _Emitter, x: str, w_t: np.ndarray, *, i: int, group: str, stats: dict | None) -> str:
    """Layer i's linear of a group (qkv, o, gate_up, down), named as onnxruntime-genai names it."""
    role = ROLES[group]
    block = "attn" if group in ("qkv", "o") else "mlp"
    return e.linear(x, w_t, wname=f"model.layers.{i}.{block}.{role}.weight", name=f"/model/layers.{i}/{block}/{role}",
                    role=role, stats=stats)


def _layer(g: GraphBuilder, e: _Emitter, i: int, cfg: LlamaConfig, *, lw: dict, stats: dict, attn: dict,
           h: str, delta: str | None) -> tuple[str, str]:
    """One decoder layer. h: the residual stream, delta: the previous layer's output not yet added
    to it (the next norm adds it). Returns (h, this layer's output)."""
    pre = f"/model/layers.{i}"
    x, h = e.add_norm(h, delta, lw["attention_norm.weight"], eps=cfg.norm_eps, name=f"{pre}/input_layernorm")
    # fused QKV; the 1/sqrt(hd) softmax scale is folded into the q rows (exact for hd = 64)
    wq = lw["attention.wq.weight"] * np.float32(cfg.head_dim ** -0.5)
    wqkv = np.concatenate([wq, lw["attention.wk.weight"], lw["attention.wv.weight"]]).T
    del wq
    qkv = _linear(e, x, wqkv, i=i, group="qkv", stats=stats.pop("qkv", None))
    del wqkv
    if attn["gqa"] is not None:
        o = _attention_gqa(g, qkv, i, cfg, gqa=attn["gqa"], pre=pre)
    elif "write" in attn:
        o = _attention_inplace(g, qkv, i, cfg, attn=attn, pre=pre)
    else:
        o = _attention_standard(g, e, qkv, i, cfg, attn=attn, pre=pre)
    o = _linear(e, o, lw["attention.wo.weight"].T, i=i, group="o", stats=stats.pop("o", None))
    x, h = e.add_norm(h, o, lw["ffn_norm.weight"], eps=cfg.norm_eps, name=f"{pre}/post_attention_layernorm")
    w13 = np.concatenate([lw["feed_forward.w1.weight"], lw["feed_forward.w3.weight"]]).T
    gu = _linear(e, x, w13, i=i, group="gate_up", stats=stats.pop("gate_up", None))
    del w13
    a = g.op("SwiGLU", [gu], name=f"{pre}/mlp/act/SwiGLU", domain=custom_ops.DOMAIN, **custom_ops.plugin_attrs())
    return h, _linear(e, a, lw["feed_forward.w2.weight"].T, i=i, group="down", stats=stats.pop("down", None))


def _qkv_heads(g: GraphBuilder, qkv: str, cfg: LlamaConfig, *, attn: dict, pre: str) -> tuple[str, str, str]:
    """q [B, H, S, hd] and k [B, K, S, hd] rotated by our RoPE op, v [B, K, S, hd]."""
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = g.op("Split", [qkv, g.const([H * hd, K * hd, K * hd])], name=f"{pre}/attn/qkv/Split", n_out=3, axis=-1)
    heads = {}
    for nm, t, n in (("q", q, H), ("k", k, K), ("v", v, K)):
        t = g.op("Reshape", [t, g.const([0, 0, n, hd])], name=f"{pre}/attn/{nm}/Reshape")
        heads[nm] = g.op("Transpose", [t], name=f"{pre}/attn/{nm}/Transpose", perm=[0, 2, 1, 3])  # [B, n, S, hd]
    cos, sin, rope_attrs = attn["cos"], attn["sin"], attn["rope_attrs"]
    q = g.op("RoPE", [heads["q"], cos, sin], name=f"{pre}/attn/q_rope/RoPE", **rope_attrs)
    k = g.op("RoPE", [heads["k"], cos, sin], name=f"{pre}/attn/k_rope/RoPE", **rope_attrs)
    return q, k, heads["v"]


def _merge_heads(g: GraphBuilder, o: str, cfg: LlamaConfig, pre: str) -> str:
    """[B, H, S, hd] -> [B, S, H*hd]."""
    o = g.op("Transpose", [o], name=f"{pre}/attn/o/Transpose", perm=[0, 2, 1, 3])
    return g.op("Reshape", [o, g.const([0, 0, cfg.n_heads * cfg.head_dim])], name=f"{pre}/attn/o/Merge")


def _attention_standard(g: GraphBuilder, e: _Emitter, qkv: str, i: int, cfg: LlamaConfig, *, attn: dict,
                        pre: str) -> str:
    """Portable attention with a Concat cache: past ++ new K/V (the present outputs), then
    MatMul -> Add(bias) -> Softmax -> MatMul in the activation dtype, the multi-head attention
    pattern TensorRT fuses (its docs: "Fused Attention", method 2, primitive layers): no Cast or Reshape
    between the two MatMuls, so fp16 scores are never materialised in float32 (and, fused, not at all).
    Grouped-query attention without copying K/V: q viewed as [B, K, rep*S, hd], a plain MHA over K
    heads whose queries are the rep heads' rows (the bias is tiled to match, see _attention_bias).
    Returns the attention output [B, S, H*hd] before o_proj."""
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = _qkv_heads(g, qkv, cfg, attn=attn, pre=pre)
    pk = g.op("Concat", [f"past_key_values.{i}.key", k], name=f"{pre}/attn/k_cache/Concat",
              outputs=[f"present.{i}.key"], axis=2)  # [B, K, T, hd]
    pv = g.op("Concat", [f"past_key_values.{i}.value", v], name=f"{pre}/attn/v_cache/Concat",
              outputs=[f"present.{i}.value"], axis=2)
    qg = g.op("Reshape", [q, g.const([0, K, -1, hd])], name=f"{pre}/attn/q_group/Reshape")  # [B, K, rep*S, hd]
    kt = g.op("Transpose", [pk], name=f"{pre}/attn/k/TransposeT", perm=[0, 1, 3, 2])
    s = g.op("MatMul", [qg, kt], name=f"{pre}/attn/qk/MatMul")  # [B, K, rep*S, T], activation dtype
    s = g.op("Add", [s, attn["bias"]], name=f"{pre}/attn/mask/Add")
    s = g.op("Softmax", [s], name=f"{pre}/attn/Softmax", axis=-1)
    o = g.op("MatMul", [s, pv], name=f"{pre}/attn/pv/MatMul")  # [B, K, rep*S, hd]
    o = g.op("Reshape", [o, g.const([0, H, -1, hd])], name=f"{pre}/attn/o/Reshape")
    return _merge_heads(g, o, cfg, pre)


def _attention_inplace(g: GraphBuilder, qkv: str, i: int, cfg: LlamaConfig, *, attn: dict, pre: str) -> str:
    """Portable attention with the in-place cache: TensorScatter writes the new K/V of row b at
    write[b] of the max-length past buffer (present = the same buffer when the runtime binds it as
    both), then the ONNX Attention op (GQA from the head counts of q and k) over its first T positions.
    TensorRT >= 10.15 maps TensorScatter (axis -2, linear) to IKVCacheUpdateLayer, whose cache must be a
    network input and its output a network output sharing the input's memory, and Attention (4-D q/k/v,
    4-D mask, no past inputs) to IAttention; scale=1 since the 1/sqrt(hd) is folded into the q rows."""
    q, k, v = _qkv_heads(g, qkv, cfg, attn=attn, pre=pre)
    window = []
    for kind, t in (("key", k), ("value", v)):
        c = g.op("TensorScatter", [f"past_key_values.{i}.{kind}", t, attn["write"]],
                 name=f"{pre}/attn/{kind}_cache/TensorScatter", outputs=[f"present.{i}.{kind}"],
                 axis=-2, mode="linear")  # [B, K, L, hd]
        window.append(g.op("Slice", [c, g.const([0]), attn["total"], g.const([2])],
                           name=f"{pre}/attn/{kind}_window/Slice"))  # [B, K, T, hd]
    o = g.op("Attention", [q, *window, attn["bias"]], name=f"{pre}/attn/Attention", scale=1.0)  # [B, H, S, hd]
    return _merge_heads(g, o, cfg, pre)


def _gqa_inputs(g: GraphBuilder) -> tuple[str, str]:
    """seqlens_k [B] = real tokens - 1 and total_sequence_length (scalar), both int32, as
    GroupQueryAttention wants them; computed once from attention_mask."""
    from onnx import TensorProto

    n = "/model/gqa"
    real = g.op("ReduceSum", ["attention_mask", g.const([1])], name=f"{n}/ReduceSum", keepdims=0)
    seqlens = g.op("Sub", [real, g.const(1)], name=f"{n}/Sub")
    seqlens = g.op("Cast", [seqlens], name=f"{n}/seqlens/Cast", to=TensorProto.INT32)
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], name=f"{n}/Shape"), g.const(1)], name=f"{n}/Gather", axis=0)
    total = g.op("Cast", [total], name=f"{n}/total/Cast", to=TensorProto.INT32)
    return seqlens, total


def _attention_gqa(g: GraphBuilder, qkv: str, i: int, cfg: LlamaConfig, *, gqa: tuple, pre: str) -> str:
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


def _lm_head(g: GraphBuilder, e: _Emitter, x: str, W, cfg: LlamaConfig, stats: dict | None):
    """logits [B, S, V] float32.

    Float: Gemm(transB) on the [V, D] table in the activation dtype, so a tied embedding is stored
    once. CPU int8/int4: a MatMulNBits copy (Recipe.lm_head_precision), since the float output
    layer is a large share of a small model's bytes per token; 8-bit, as the output layer is
    sensitive, 4-bit only in the compact recipe. stats: the final norm's output on the calibration
    text (weighted rounding and bias correction, as the projections get)."""
    if e.recipe.form(LM_HEAD) is not None:
        w = W["tok_embeddings.weight"] if cfg.tie_embeddings else W["output.weight"]
        y = e.linear(x, w.T, wname="lm_head.weight", name="/lm_head", role=LM_HEAD, stats=stats)
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


def _attention_bias(g: GraphBuilder, e: _Emitter, *, rep: int) -> str:
    """Additive bias in the activation dtype, 0 where key j is visible to query i (j <= P + i and the
    key is a real token), MASK_VALUE elsewhere: [B, 1, S, T], tiled to [B, 1, rep*S, T] for the grouped
    query layout of _attention_standard (row r*S + i is query i of the group's head r). Computed once."""
    n = "/model/attn_bias"
    s_len = g.op("Gather", [g.op("Shape", ["input_ids"], name=f"{n}/ids/Shape"), g.const(1)], name=f"{n}/S/Gather", axis=0)
    t_len = g.op("Gather", [g.op("Shape", ["attention_mask"], name=f"{n}/mask/Shape"), g.const(1)], name=f"{n}/T/Gather", axis=0)
    past = g.op("Sub", [t_len, s_len], name=f"{n}/P/Sub")
    kpos = g.op("Range", [g.const(0), t_len, g.const(1)], name=f"{n}/kpos/Range")  # [T]
    qpos = g.op("Range", [past, t_len, g.const(1)], name=f"{n}/qpos/Range")        # [S]
    kpos = g.op("Unsqueeze", [kpos, g.const([0])], name=f"{n}/kpos/Unsqueeze")     # [1, T]
    qpos = g.op("Unsqueeze", [qpos, g.const([1])], name=f"{n}/qpos/Unsqueeze")     # [S, 1]
    causal = g.op("LessOrEqual", [kpos, qpos], name=f"{n}/causal/LessOrEqual")      # [S, T]
    bias = _mask_bias(g, e, causal, n)                                              # [B, 1, S, T]
    if rep > 1:
        bias = g.op("Tile", [bias, g.const([1, 1, rep, 1])], name=f"{n}/Tile")       # [B, 1, rep*S, T]
    return bias


def _mask_bias(g: GraphBuilder, e: _Emitter, causal: str, n: str) -> str:
    """causal (bool, [S, T] or [B, 1, S, T]: key j within query i's reach) -> the [B, 1, S, T] additive bias in the activation
    dtype: 0 where the key is also a real token (attention_mask), MASK_VALUE elsewhere."""
    from onnx import TensorProto

    real = g.op("Cast", ["attention_mask"], name=f"{n}/real/Cast", to=TensorProto.BOOL)  # [B, T]
    real = g.op("Unsqueeze", [real, g.const([1, 2])], name=f"{n}/real/Unsqueeze")   # [B, 1, 1, T]
    vis = g.op("And", [causal, real], name=f"{n}/And")
    return g.op("Where", [vis, g.const(0.0, e.np_act), g.const(MASK_VALUE[e.act], e.np_act)], name=f"{n}/Where")


def _inplace_inputs(g: GraphBuilder, e: _Emitter) -> dict:
    """What the in-place attention of every layer shares, computed once from attention_mask [B, T]:
      write [B]  where row b's S new tokens go: (its last real column + 1) - S. A left-padded batch
                 (the columns are cache positions, the new tokens the last S) writes at T - S; a row
                 shorter than T whose mask is 1 up to its length and 0 after (runtime.slots.InplaceSlots: rows
                 of their own lengths in one buffer) writes right after its own tokens.
      bias [B, 1, S, T]  activation dtype: key j visible to query i iff mask[b, j] and j <= write[b] + i.
      total [1]  T, the cache window attention reads (positions >= T of the buffer are never read)."""
    n = "/model/kv_write"
    t_vec = g.op("Shape", ["attention_mask"], name=f"{n}/T/Shape", start=1, end=2)      # [1]
    s_vec = g.op("Shape", ["input_ids"], name=f"{n}/S/Shape", start=1, end=2)           # [1]
    t_len = g.op("Squeeze", [t_vec, g.const([0])], name=f"{n}/T/Squeeze")
    s_len = g.op("Squeeze", [s_vec, g.const([0])], name=f"{n}/S/Squeeze")
    cols = g.op("Range", [g.const(1), g.op("Add", [t_len, g.const(1)], name=f"{n}/T1/Add"), g.const(1)],
                name=f"{n}/cols/Range")                                                    # [T]: 1..T
    last = g.op("ReduceMax", [g.op("Mul", ["attention_mask", cols], name=f"{n}/last/Mul"), g.const([1])],
                name=f"{n}/last/ReduceMax", keepdims=0)                                    # [B]
    write = g.op("Sub", [last, s_len], name=f"{n}/write/Sub")                            # [B]
    steps = g.op("Range", [g.const(0), s_len, g.const(1)], name=f"{n}/steps/Range")     # [S]
    qpos = g.op("Add", [g.op("Unsqueeze", [write, g.const([1])], name=f"{n}/write/Unsqueeze"), steps],
                name=f"{n}/qpos/Add")                                                      # [B, S]
    kpos = g.op("Range", [g.const(0), t_len, g.const(1)], name=f"{n}/kpos/Range")       # [T]
    causal = g.op("LessOrEqual", [kpos, g.op("Unsqueeze", [qpos, g.const([2])], name=f"{n}/qpos/Unsqueeze")],
                  name=f"{n}/causal/LessOrEqual")                                          # [B, S, T]
    causal = g.op("Unsqueeze", [causal, g.const([1])], name=f"{n}/causal/Unsqueeze")    # [B, 1, S, T]
    return {"write": write, "bias": _mask_bias(g, e, causal, n), "total": t_vec}

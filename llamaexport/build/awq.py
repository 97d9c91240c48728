"""Calibrated quantization layer by layer inside the streaming export: AWQ (weight-only int8/int4)
and SmoothQuant (W8A8, see apply_smoothquant).

Calibration text runs through the model one layer at a time (hidden states [N, D] are all that
is kept between layers, so memory stays bounded). For each group of linears sharing an input,
a per-input-channel scale s = mean|x|^alpha is searched (alpha in 0..1) to minimise the output
error || X W^T - (X / s) Q(W s)^T ||^2 under the target's quantizer Q, then folded into the
op that produces that input, so the graph keeps its shape:
  q/k/v (input RMSNorm)  -> divide the attention_norm weight by s
  gate/up (input RMSNorm)-> divide the ffn_norm weight by s
  o_proj (input P.V)     -> divide the v_proj rows by s (s shared by the heads of a KV group)
  down (input silu(g)*u) -> divide the up_proj rows by s
The same calibration inputs then serve the export twice more: the rounding of each block is
weighted by the input's mean square (importance), and each quantized linear gets a bias
-mean(x) (W_q - W)^T that cancels the mean of its output error (bias correction). With GPTQ (a
recipe whose quant_method is gptq), input_stats also keeps E[x x^T] and the rounding is GPTQ's
(quantize._gptq) instead of the weighted one.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from llamaexport.build.quantize import gptq_damp

ALPHAS = np.linspace(0.0, 1.0, 11)
CALIBRATION_TOKENS = 4096  # of the calibration text: statistics, GPTQ's E[x x^T] and the bias correction
SEARCH_TOKENS = 512        # of those, a seeded sample for the AWQ scale search (11 trial quantizations each)
SMOOTHQUANT_TOKENS = 512   # w8a8: its static activation ranges are searched on these


def calibration_ids(tokenizer, vocab_size: int, *, n_tokens: int = CALIBRATION_TOKENS, files=None,
                    seq_len: int = 256) -> np.ndarray:
    """Token ids [n_seq, seq_len] from the shipped calibration text (or `files`), or seeded
    random ids when there is no tokenizer (random-weight builds)."""
    if tokenizer is None:
        return np.random.default_rng(0).integers(0, vocab_size, (max(1, n_tokens // seq_len), seq_len))
    if files:
        text = "\n\n".join(open(f, encoding="utf-8").read() for f in files)
    else:
        text = resources.files("llamaexport").joinpath("data/calibration.txt").read_text()
    ids = tokenizer.encode(text)
    n = max(1, min(len(ids), n_tokens) // seq_len)
    if len(ids) < seq_len:
        seq_len, n = len(ids), 1
    return np.array(ids[: n * seq_len]).reshape(n, seq_len)


class LayerwiseCalibrator:
    """Runs calibration hidden states through one reference layer at a time (torch, fp32)."""

    def __init__(self, cfg, ids: np.ndarray, embedding: np.ndarray):
        import torch

        from llamaexport.model.config import rope_tables
        from llamaexport.model.reference import attention_bias, rope_at

        self.cfg, self.torch = cfg, torch
        self.h = torch.from_numpy(embedding[ids])  # [B, T, D]
        B, T = ids.shape
        cos, sin = rope_tables(cfg, T)
        positions = torch.arange(T)[None].expand(B, T)
        self.cos, self.sin = rope_at(torch.from_numpy(cos), torch.from_numpy(sin), positions)  # [B, 1, T, rd/2]
        self.bias = attention_bias(torch.ones(B, T, dtype=torch.long), T)  # causal [B, 1, T, T]
        self.empty = torch.zeros(B, cfg.n_kv_heads, 0, cfg.head_dim)

    def layer(self, w: dict) -> dict:
        """w: this layer's weights without the `layers.{i}.` prefix. Returns the inputs of each
        linear group as float32 [N, K] arrays, and advances the hidden states."""
        from llamaexport.model.reference import Block

        torch = self.torch
        with torch.device("meta"):
            block = Block(self.cfg)
        block.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in w.items()}, assign=True)
        seen = {}

        def keep(name):
            return lambda mod, inp, out: seen.__setitem__(name, inp[0].reshape(-1, inp[0].shape[-1]).numpy())

        hooks = [block.attention.wq.register_forward_hook(keep("qkv")),
                 block.attention.wo.register_forward_hook(keep("o")),
                 block.feed_forward.w1.register_forward_hook(keep("gate_up")),
                 block.feed_forward.w2.register_forward_hook(keep("down"))]
        with torch.inference_mode():
            self.h, _, _ = block(self.h, self.cos, self.sin, self.bias, self.empty, self.empty)
        for hk in hooks:
            hk.remove()
        return seen

    def final_norm(self, norm_w: np.ndarray) -> np.ndarray:
        """The output layer's input on the calibration text: RMSNorm of the last hidden states
        (float64 arithmetic, float32 result) [N, D]."""
        hs = self.h.numpy().reshape(-1, self.cfg.dim).astype(np.float64)
        return (hs / np.sqrt((hs ** 2).mean(axis=1, keepdims=True) + self.cfg.norm_eps) * norm_w).astype(np.float32)


def _best_scale(x: np.ndarray, ws: list[np.ndarray], xm: np.ndarray, fake_quant, act_quant=None) -> np.ndarray:
    """The s = xm^alpha (alpha on a grid) minimising the summed output error of `ws` ([N_i, K],
    sharing input x [N, K]) when each is quantized as Q(W s) / s. The quantizer sees the input's
    importance (mean square of x / s), and the error is measured after the bias correction the
    export applies (its mean over the calibration tokens removed). act_quant(x / s): what the
    kernel multiplies instead of x / s (ONNX Runtime CPU's int8 activations), or None (exact):
    then a scale also trades the activations' rounding error, as SmoothQuant's does."""
    x2 = (x.astype(np.float64) ** 2).mean(axis=0)
    ref = None if act_quant is None else [x @ w.T for w in ws]  # the float outputs: the same for every alpha
    best_s, best_err = None, None
    for a in ALPHAS:
        s = xm ** a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        imp = (x2 / s.astype(np.float64) ** 2).astype(np.float32)
        err = 0.0
        xq = None if act_quant is None else act_quant(x / s)
        for i, w in enumerate(ws):
            if xq is None:
                e = x @ (fake_quant((w * s).T, imp) / s[:, None] - w.T)  # [N, out]
            else:
                e = xq @ fake_quant((w * s).T, imp) - ref[i]
            err += float(((e - e.mean(axis=0)) ** 2).mean())
        if best_err is None or err < best_err:
            best_err, best_s = err, s
    return best_s


def search_sample(x: np.ndarray) -> np.ndarray:
    """At most SEARCH_TOKENS rows of x [N, K] (a seeded sample, in order) for the scale search: its
    cost is 11 quantizations and products per group, so its tokens are capped while the statistics
    the rounding uses (input_stats) take every calibration token."""
    if len(x) <= SEARCH_TOKENS:
        return x
    return x[np.sort(np.random.default_rng(0).choice(len(x), SEARCH_TOKENS, replace=False))]


def _group_scale(xm_heads: np.ndarray, n_kv: int, rep: int, hd: int) -> np.ndarray:
    """[H*hd] per-channel means -> the same value for the `rep` heads of each KV group."""
    g = np.exp(np.log(xm_heads.reshape(n_kv, rep, hd)).mean(axis=1))  # [n_kv, hd]
    return np.repeat(g[:, None, :], rep, axis=1).reshape(-1)


def _group_max(v: np.ndarray, n_kv: int, rep: int, hd: int) -> np.ndarray:
    """[H*hd] per-channel maxima -> the max over the `rep` heads of each KV group, repeated."""
    return np.repeat(v.reshape(n_kv, rep, hd).max(axis=1, keepdims=True), rep, axis=1).reshape(-1)


def input_stats(x: np.ndarray, s: np.ndarray | None = None, *, hessian: bool = False, act_quant=None) -> dict:
    """What the export needs of a linear's calibration input x [N, K] (divided by the folded AWQ
    scale s): `mean` for the bias correction, `imp` (mean square) for weighted rounding and, with
    hessian=True, `hessian` (E[x x^T], float32 [K, K]) for GPTQ rounding (quantize._gptq).
    act_quant (what the kernel multiplies instead of x, see _best_scale): `qmean`, its mean, so the
    bias correction also cancels the activation rounding's mean error, as the AWQ search assumed."""
    xs = x if s is None else x / s
    x = x.astype(np.float64) if s is None else x.astype(np.float64) / s
    st = {"mean": x.mean(axis=0).astype(np.float32), "imp": (x ** 2).mean(axis=0).astype(np.float32),
          "absmax": float(np.abs(x).max())}
    if act_quant is not None:
        st["qmean"] = act_quant(xs).astype(np.float64).mean(axis=0).astype(np.float32)
    if hessian:  # in float32 (what _gptq uses): no K x K float64 temporary (0.97 GB for a 7B down projection)
        xf = x.astype(np.float32)
        st["hessian"] = (xf.T @ xf) / np.float32(len(x))
        st["damp"] = gptq_damp(len(x), x.shape[1])
    return st


def _for_group(act_quant, group: str):
    """act_quant(x, group) bound to one group (None stays None)."""
    return None if act_quant is None else (lambda v: act_quant(v, group))


def _fold(cfg, w: dict, acts: dict, choose, hessian: bool = False, act_quant=None) -> tuple[dict, dict]:
    """Search a per-input-channel scale s for each linear group with choose(x, ws, group) and fold
    it (W * s, the input's producer / s; see module docstring). Returns the folded weights and
    the input statistics of each group after folding (see input_stats)."""
    w, stats = dict(w), {}

    # q/k/v share the attention_norm output
    x = acts["qkv"]
    s = choose(x, [w["attention.wq.weight"], w["attention.wk.weight"], w["attention.wv.weight"]], "qkv")
    for k in ("wq", "wk", "wv"):
        w[f"attention.{k}.weight"] = w[f"attention.{k}.weight"] * s[None, :]
    w["attention_norm.weight"] = w["attention_norm.weight"] / s
    stats["qkv"] = input_stats(x, s, hessian=hessian, act_quant=_for_group(act_quant, "qkv"))
    # gate/up share the ffn_norm output
    x = acts["gate_up"]
    s = choose(x, [w["feed_forward.w1.weight"], w["feed_forward.w3.weight"]], "gate_up")
    for k in ("w1", "w3"):
        w[f"feed_forward.{k}.weight"] = w[f"feed_forward.{k}.weight"] * s[None, :]
    w["ffn_norm.weight"] = w["ffn_norm.weight"] / s
    stats["gate_up"] = input_stats(x, s, hessian=hessian, act_quant=_for_group(act_quant, "gate_up"))
    # down: its input is silu(gate) * up, linear in up's rows
    x = acts["down"]
    s = choose(x, [w["feed_forward.w2.weight"]], "down")
    w["feed_forward.w2.weight"] = w["feed_forward.w2.weight"] * s[None, :]
    w["feed_forward.w3.weight"] = w["feed_forward.w3.weight"] / s[:, None]
    stats["down"] = input_stats(x, s, hessian=hessian, act_quant=_for_group(act_quant, "down"))
    # o_proj: its input is P.V per head; a scale must be shared by the heads of a KV group
    x = acts["o"]
    s = choose(x, [w["attention.wo.weight"]], "o")
    w["attention.wo.weight"] = w["attention.wo.weight"] * s[None, :]
    s_kv = s.reshape(cfg.n_kv_heads, cfg.n_rep, cfg.head_dim)[:, 0, :].reshape(-1)  # [KVH*hd]
    w["attention.wv.weight"] = w["attention.wv.weight"] / s_kv[:, None]
    stats["o"] = input_stats(x, s, hessian=hessian, act_quant=_for_group(act_quant, "o"))
    return w, stats


def apply_awq(cfg, w: dict, acts: dict, fake_quant, *, hessian: bool = False, act_quant=None) -> tuple[dict, dict]:
    """Return this layer's weights with AWQ scales searched and folded (see module docstring), and
    the input statistics of each linear group after folding (see input_stats).

    fake_quant(w_t [K, N], imp [K], group) -> the dequantized w_t as the export quantizes that group.
    act_quant(x [N, K], group) -> what the target's kernel multiplies instead of x (None: x itself)."""

    def choose(x, ws, group):
        xm = np.abs(x).mean(axis=0).astype(np.float64) + 1e-8
        if group == "o":
            xm = _group_scale(xm, cfg.n_kv_heads, cfg.n_rep, cfg.head_dim)
        return _best_scale(search_sample(x), ws, xm, lambda w_t, imp: fake_quant(w_t, imp, group),
                           _for_group(act_quant, group))

    return _fold(cfg, w, acts, choose, hessian, act_quant)


# ---------------------------------------------------------------- SmoothQuant (W8A8)
SQ_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SQ_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def fake_quant_activation(x: np.ndarray, amax: float) -> np.ndarray:
    """Per-tensor symmetric int8, as QuantizeLinear/DequantizeLinear with scale amax / 127."""
    scale = np.float32(max(amax, 1e-8) / 127.0)
    return np.clip(np.rint(x / scale), -127, 127) * scale


def apply_smoothquant(cfg, w: dict, acts: dict, fake_quant, groups=("qkv", "o", "gate_up", "down")) -> tuple[dict, dict]:
    """SmoothQuant (Xiao et al. 2023) for W8A8: per input channel s = max|x|^a / max|W|^(1-a)
    moves activation outliers into the weights (folded as for AWQ), so one static int8 scale per
    activation tensor suffices. For each group, a (on SQ_ALPHAS) and then the activation clip
    (amax * c, c on SQ_CLIPS) are chosen to minimise the group's W8A8 output error on the
    calibration text. Returns (weights, stats); stats[group]["amax"] is the clipped max |x / s|,
    the static activation range the graph's QuantizeLinear uses, and stats[group]["qmean"] the
    mean of the int8-rounded input, so the bias correction also cancels the mean error of the
    activation rounding and clipping (which the search's mean-removed error assumes). Groups not in `groups` keep
    float activations (weight-only int8): no smoothing, no range.

    fake_quant(w_t [K, N], imp [K], group) -> the dequantized int8 weight as the export stores that group."""
    clip, amax, qmean = {}, {}, {}

    def quantized_weights(x, ws, s, group):
        """The dequantized int8 weights for scale s (they do not depend on the activation clip)."""
        imp = ((x / s).astype(np.float64) ** 2).mean(axis=0).astype(np.float32)
        return [fake_quant((wi * s).T, imp, group) for wi in ws]

    def err(x, ws, s, wqs, c):
        xs = x / s
        xq = fake_quant_activation(xs, float(np.abs(xs).max()) * c)
        total = 0.0
        for wi, wq in zip(ws, wqs):
            e = xq @ wq - x @ wi.T
            total += float(((e - e.mean(axis=0)) ** 2).mean())
        return total

    def choose(x, ws, group):
        if group not in groups:
            return np.ones(x.shape[1], np.float32)
        xa = np.abs(x).max(axis=0).astype(np.float64) + 1e-8
        wa = np.max([np.abs(wi).max(axis=0) for wi in ws], axis=0).astype(np.float64) + 1e-8
        if group == "o":  # one scale per KV group's channels: the max over its heads
            xa = _group_max(xa, cfg.n_kv_heads, cfg.n_rep, cfg.head_dim)
            wa = _group_max(wa, cfg.n_kv_heads, cfg.n_rep, cfg.head_dim)
        best = None
        for a in SQ_ALPHAS:
            s = (xa ** a / wa ** (1 - a))
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            wqs = quantized_weights(x, ws, s, group)
            e = err(x, ws, s, wqs, 1.0)
            if best is None or e < best[0]:
                best = (e, s, wqs)
        _, s, wqs = best
        clip[group] = min(SQ_CLIPS, key=lambda c: err(x, ws, s, wqs, c))
        xs = x / s
        amax[group] = float(np.abs(xs).max()) * clip[group]
        qmean[group] = fake_quant_activation(xs, amax[group]).astype(np.float64).mean(axis=0).astype(np.float32)
        return s

    w, stats = _fold(cfg, w, acts, choose)
    for group in clip:
        stats[group].update(amax=amax[group], qmean=qmean[group])
    return w, stats

"""Activation-aware weight quantization (AWQ), layer by layer inside the streaming export.

Calibration text runs through the model one layer at a time (hidden states [N, D] are all that
is kept between layers, so memory stays bounded). For each group of linears sharing an input,
a per-input-channel scale s = mean|x|^alpha is searched (alpha in 0..1) to minimise the output
error || X W^T - (X / s) Q(W s)^T ||^2 under the target's quantizer Q, then folded into the
op that produces that input, so the graph is unchanged:
  q/k/v (input RMSNorm)  -> divide the attention_norm weight by s
  gate/up (input RMSNorm)-> divide the ffn_norm weight by s
  o_proj (input P.V)     -> divide the v_proj rows by s (s shared by the heads of a KV group)
  down (input silu(g)*u) -> divide the up_proj rows by s
"""

from __future__ import annotations

from importlib import resources

import numpy as np

ALPHAS = np.linspace(0.0, 1.0, 11)


def calibration_ids(tokenizer, vocab_size: int, *, n_tokens: int = 512, files=None, seq_len: int = 256) -> np.ndarray:
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

        from .config import rope_tables

        self.cfg, self.torch = cfg, torch
        self.h = torch.from_numpy(embedding[ids])  # [B, T, D]
        B, T = ids.shape
        cos, sin = rope_tables(cfg, T)
        self.cos = torch.from_numpy(cos)[None, None].expand(B, 1, T, -1)
        self.sin = torch.from_numpy(sin)[None, None].expand(B, 1, T, -1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        self.bias = torch.zeros(T, T).masked_fill(~causal, torch.finfo(torch.float32).min)[None, None]
        self.empty = torch.zeros(B, cfg.n_kv_heads, 0, cfg.head_dim)

    def layer(self, w: dict) -> dict:
        """w: this layer's weights without the `layers.{i}.` prefix. Returns the inputs of each
        linear group as float32 [N, K] arrays, and advances the hidden states."""
        from .model import Block

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


def _best_scale(x: np.ndarray, ws: list[np.ndarray], xm: np.ndarray, fake_quant) -> np.ndarray:
    """The s = xm^alpha (alpha on a grid) minimising the summed output error of `ws` ([N_i, K],
    sharing input x [N, K]) when each is quantized as Q(W s) / s."""
    refs = [x @ w.T for w in ws]
    best_s, best_err = None, None
    for a in ALPHAS:
        s = xm ** a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = sum(float(((x @ (fake_quant((w * s).T).T / s).T - ref) ** 2).mean()) for w, ref in zip(ws, refs))
        if best_err is None or err < best_err:
            best_err, best_s = err, s
    return best_s


def _search(x: np.ndarray, ws: list[np.ndarray], fake_quant) -> np.ndarray:
    return _best_scale(x, ws, np.abs(x).mean(axis=0).astype(np.float64) + 1e-8, fake_quant)


def _group_scale(xm_heads: np.ndarray, n_kv: int, rep: int, hd: int) -> np.ndarray:
    """[H*hd] per-channel means -> the same value for the `rep` heads of each KV group."""
    g = np.exp(np.log(xm_heads.reshape(n_kv, rep, hd)).mean(axis=1))  # [n_kv, hd]
    return np.repeat(g[:, None, :], rep, axis=1).reshape(-1)


def apply_awq(cfg, w: dict, acts: dict, fake_quant) -> dict:
    """Return this layer's weights with AWQ scales searched and folded (see module docstring)."""
    w = dict(w)
    # q/k/v share the attention_norm output
    s = _search(acts["qkv"], [w["attention.wq.weight"], w["attention.wk.weight"], w["attention.wv.weight"]], fake_quant)
    for k in ("wq", "wk", "wv"):
        w[f"attention.{k}.weight"] = w[f"attention.{k}.weight"] * s[None, :]
    w["attention_norm.weight"] = w["attention_norm.weight"] / s
    # gate/up share the ffn_norm output
    s = _search(acts["gate_up"], [w["feed_forward.w1.weight"], w["feed_forward.w3.weight"]], fake_quant)
    for k in ("w1", "w3"):
        w[f"feed_forward.{k}.weight"] = w[f"feed_forward.{k}.weight"] * s[None, :]
    w["ffn_norm.weight"] = w["ffn_norm.weight"] / s
    # down: its input is silu(gate) * up, linear in up's rows
    s = _search(acts["down"], [w["feed_forward.w2.weight"]], fake_quant)
    w["feed_forward.w2.weight"] = w["feed_forward.w2.weight"] * s[None, :]
    w["feed_forward.w3.weight"] = w["feed_forward.w3.weight"] / s[:, None]
    # o_proj: its input is P.V per head; a scale must be shared by the heads of a KV group
    x = acts["o"]
    xm = _group_scale(np.abs(x).mean(axis=0).astype(np.float64) + 1e-8, cfg.n_kv_heads, cfg.n_rep, cfg.head_dim)
    s = _best_scale(x, [w["attention.wo.weight"]], xm, fake_quant)
    w["attention.wo.weight"] = w["attention.wo.weight"] * s[None, :]
    s_kv = s.reshape(cfg.n_kv_heads, cfg.n_rep, cfg.head_dim)[:, 0, :].reshape(-1)  # [KVH*hd]
    w["attention.wv.weight"] = w["attention.wv.weight"] / s_kv[:, None]
    return w

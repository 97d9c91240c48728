"""The eager PyTorch reference model: the parity reference for every artifact.

Weights use the canonical (Meta) layout: `layers.{i}.attention.wq.weight` etc., with q/k rows in
Meta's interleaved rotary order (pairs (2j, 2j+1) rotate together). Loaders undo other
conventions (HF's rotary permutation) before weights get here.

The forward is a pure function: positions, mask and cache go in as tensors, logits and the
new cache come out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaexport.model.config import LlamaConfig, rope_tables
from llamaexport.model.kv_form import KVForm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def apply_rope(x, cos, sin, *, rope_dim: int, interleaved: bool = True):
    """Rotate the first `rope_dim` dims of each head in real cos/sin arithmetic.

    x: [B, H, S, hd]; cos, sin: [B, 1, S, rope_dim/2].
    interleaved: pairs (2j, 2j+1) (Meta); else halves (j, j + rope_dim/2) (HF / GPT-NeoX).
    """
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rope_at(cos_table, sin_table, position_ids, dtype=torch.float32):
    """The rotary tables [n, rope_dim/2] at position_ids [B, S] -> cos, sin [B, 1, S, rope_dim/2]."""
    return (cos_table[position_ids].unsqueeze(1).to(dtype), sin_table[position_ids].unsqueeze(1).to(dtype))


def attention_bias(attention_mask, seq_len: int, dtype=torch.float32):
    """Additive bias [B, 1, S, T] for S new tokens after T - S cached ones: 0 where key j is visible
    to query i (j <= T - S + i and the key is a real token), the dtype's minimum elsewhere."""
    T = attention_mask.shape[1]
    causal = torch.arange(T)[None, :] <= (T - seq_len + torch.arange(seq_len))[:, None]  # [S, T]
    visible = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


def swiglu(gate, up):
    """silu(gate) * up."""
    return F.silu(gate) * up


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        # x: [B, S, D]; bias: [B, 1, S, P+S] additive; past_k/v: [B, KVH, P, hd]
        c = self.cfg
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, S, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, S, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, rope_dim=c.rope_dim)
        k = apply_rope(k, cos, sin, rope_dim=c.rope_dim)
        k = torch.cat((past_k, k), dim=2)  # [B, KVH, P+S, hd]
        v = torch.cat((past_v, v), dim=2)
        kk = k.repeat_interleave(c.n_rep, dim=1)  # [B, H, P+S, hd]
        vv = v.repeat_interleave(c.n_rep, dim=1)
        scores = (q @ kk.transpose(-1, -2)) * (c.head_dim ** -0.5) + bias
        out = scores.float().softmax(-1).type_as(q) @ vv  # [B, H, S, hd]
        return self.wo(out.transpose(1, 2).reshape(B, S, -1)), k, v


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, h, cos, sin, bias, past_k, past_v):
        a, k, v = self.attention(self.attention_norm(h), cos, sin, bias, past_k, past_v)
        h = h + a
        return h + self.feed_forward(self.ffn_norm(h)), k, v


class Transformer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

    def empty_cache(self, batch: int = 1, dtype=torch.float32):
        c = self.cfg
        z = torch.zeros(batch, c.n_kv_heads, 0, c.head_dim, dtype=dtype)
        return [(z, z) for _ in range(c.n_layers)]

    def forward(self, input_ids, attention_mask, position_ids, past):
        """input_ids, position_ids: [B, S]; attention_mask: [B, P+S] (1 = real token);
        past: list of (k, v) each [B, KVH, P, hd]. Returns logits [B, S, V] float32, present."""
        h = self.tok_embeddings(input_ids)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, position_ids, h.dtype)  # [B, 1, S, rd/2]
        bias = attention_bias(attention_mask, input_ids.shape[1], h.dtype)
        present = []
        for layer, (pk, pv) in zip(self.layers, past):
            h, k, v = layer(h, cos, sin, bias, pk.to(h.dtype), pv.to(h.dtype))
            present.append((k, v))
        return self.output(self.norm(h)).float(), present


def build_reference(cfg: LlamaConfig, weights, *, dtype=torch.float32) -> Transformer:
    """A reference model holding `weights` (name -> numpy array or tensor, canonical names).

    Strict: every parameter must be present with its exact shape, and nothing extra."""
    from llamaexport import LlamaExportError

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(weights.keys()))
    extra = sorted(set(weights.keys()) - set(expected))
    if missing or extra:
        raise LlamaExportError(
            f"checkpoint keys do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    state = {}
    for name, shape in expected.items():
        w = weights[name]
        t = w if isinstance(w, torch.Tensor) else torch.from_numpy(w if w.flags.writeable else w.copy())
        if tuple(t.shape) != shape:
            raise LlamaExportError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {shape}")
        state[name] = t.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    cos, sin = rope_tables(cfg)
    model.rope_cos, model.rope_sin = torch.from_numpy(cos), torch.from_numpy(sin)
    return model.eval()


@torch.inference_mode()
def intermediates(model: Transformer, input_ids) -> dict:
    """One teacher-forced forward of input_ids [B, S] from an empty cache, returning the tensors
    `check --layerwise` compares (float32 numpy), captured with forward hooks:
      embed                    the embedding rows [B, S, D]
      layers.{i}.attention     the attention output before wo [B, S, H*hd]
      layers.{i}.attention.wo  ... after wo [B, S, D]
      layers.{i}.feed_forward  the MLP output [B, S, D]
      layers.{i}               the residual stream after the layer [B, S, D]
      logits                   [B, S, V]"""
    out, hooks = {}, []

    def keep(key, pre=False):
        def hook(module, args, result=None):
            t = args[0] if pre else result[0] if isinstance(result, tuple) else result
            out[key] = t.float().numpy().copy()
        return hook

    hooks.append(model.tok_embeddings.register_forward_hook(keep("embed")))
    for i, layer in enumerate(model.layers):
        hooks.append(layer.attention.wo.register_forward_pre_hook(keep(f"layers.{i}.attention", pre=True)))
        hooks.append(layer.attention.wo.register_forward_hook(keep(f"layers.{i}.attention.wo")))
        hooks.append(layer.feed_forward.register_forward_hook(keep(f"layers.{i}.feed_forward")))
        hooks.append(layer.register_forward_hook(keep(f"layers.{i}")))
    try:
        ids = torch.as_tensor(input_ids, dtype=torch.int64)
        B, S = ids.shape
        logits, _ = model(ids, torch.ones(B, S, dtype=torch.int64), torch.arange(S).expand(B, S), model.empty_cache(B))
    finally:
        for h in hooks:
            h.remove()
    out["logits"] = logits.numpy()
    return out


class ReferenceBackend:
    """The reference model behind the runtime's Backend protocol (runtime.llama_model), so that `check`
    drives the reference and the artifact through the same decode loop (LlamaModel.steps)."""

    threads = None
    kv_form = KVForm.CONCAT  # its cache grows by concatenation
    max_batch = None         # any batch

    def __init__(self, model: Transformer):
        self.model = model

    def empty_cache(self, batch: int):
        return self.model.empty_cache(batch)

    def take_cache(self, batch: int):
        return self.model.empty_cache(batch)

    def give_back_cache(self, batch: int, cache):
        pass

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        logits, cache = self.model(*(torch.as_tensor(a, dtype=torch.int64)
                                     for a in (input_ids, attention_mask, position_ids)), cache)
        return logits.numpy(), cache

    def close(self):
        self.model = None

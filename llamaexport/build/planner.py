"""The memory planner: what a model needs on a profile, per precision, and what to build.

Adds up, for a batch and context length:
  weights      quantized matrices + their scales, embeddings, norms, rotary tables
  KV cache     2 x layers x KV heads x head_dim x context x batch x bytes
  activations  the larger of the engine's two optimization profiles' peaks (prefill at the full context,
               decode of one token on it): the float32 logits of the kept rows plus the most the graph
               holds at once (a layer's attention scores in the graph's dtype, its MLP, or the output
               layer; activation_terms). The TensorRT runtime gives its prefill and decode contexts one
               shared activation region of that size (tensorrt.backend), so it is the max over
               profiles, not their sum.
  workspace    the TensorRT builder/runtime workspace from the profile
  overhead     runtime itself: CUDA context, cuBLAS and TensorRT (GPU), ONNX Runtime (CPU)
and compares the total with the profile's budget (memory - reserved for the OS/display).
The decode ceiling is bandwidth / bytes read per generated token (all weights once, plus the
KV cache at the full context): a memory-bound decode cannot beat it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from llamaexport import LlamaExportError, whole_number
from llamaexport.build.profiles import Profile
from llamaexport.build.recipe import EMBED_BLOCK, EXPLICIT_ONLY, LM_HEAD, PREFERENCE, Precision, Recipe
from llamaexport.model.config import LlamaConfig

GiB = 2**30
OVERHEAD = {"tensorrt": 0.75 * GiB, "onnxruntime": 0.25 * GiB}


@dataclasses.dataclass(frozen=True)
class Plan:
    recipe: Recipe
    weights: float
    kv_cache: float
    activations: float
    workspace: float
    overhead: float
    budget: float
    bytes_per_token: float
    bandwidth_gbs: float

    @property
    def precision(self) -> Precision:
        return self.recipe.precision

    @property
    def label(self) -> str:
        return self.recipe.label

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.workspace + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def decode_ceiling(self) -> float:
        return self.bandwidth_gbs * 1e9 / self.bytes_per_token


def _matrix_bytes(K: int, N: int, *, recipe: Recipe, role: str) -> float:
    """Stored bytes of one role's [K, N] linear in the form the recipe gives it."""
    form = recipe.form(role)
    if form is None:
        return float(recipe.activation_bytes * K * N)
    if form.nbits:  # MatMulNBits: K padded to whole blocks, fp32 scale per block, + zero points
        nb = -(-K // form.block)
        zero_points = 0 if form.symmetric else nb if form.bits == 8 else -(-nb // 2)
        return N * (nb * form.block * form.bits / 8 + 4 * nb + zero_points)
    if form.bits == 8:  # per-channel fp16 scales: negligible
        return 1.0 * K * N
    return (0.5 + 2.0 / form.block) * K * N  # INT4: fp16 scale per block


def weight_bytes(cfg: LlamaConfig, recipe: Recipe) -> tuple[float, float]:
    """(bytes stored, bytes read per decoded token)."""
    act = recipe.activation_bytes
    d, hd = cfg.dim, cfg.head_dim
    shapes = {"qkv_proj": (d, hd * (cfg.n_heads + 2 * cfg.n_kv_heads)), "o_proj": (hd * cfg.n_heads, d),
              "gate_up_proj": (d, 2 * cfg.ffn_dim), "down_proj": (cfg.ffn_dim, d)}  # [K, N]
    body = cfg.n_layers * sum(_matrix_bytes(K, N, recipe=recipe, role=role) for role, (K, N) in shapes.items())
    emb = cfg.vocab_size * d * ((1 + 5 / EMBED_BLOCK)  # GatherBlockQuantized: uint8, fp32 scale + zero point
                                if recipe.quantized_embedding(d) else act)
    if recipe.lm_head_precision is not None:   # a quantized lm_head copy
        head = _matrix_bytes(d, cfg.vocab_size, recipe=recipe, role=LM_HEAD)
    else:
        head = 0 if cfg.tie_embeddings else cfg.vocab_size * d * act
    small = (2 * cfg.n_layers + 1) * d * 4 + 2 * cfg.max_seq_len * cfg.rope_dim // 2 * act
    stored = body + emb + head + small
    read = body + (head if head else emb) + small  # the embedding lookup reads one row
    return stored, read


def profile_tokens(context: int) -> list[tuple[int, int, int]]:
    """(new tokens, cached tokens, logits rows kept) at the largest values of each optimization profile
    the engine has (tensorrt.builder.profile_shapes), which TensorRT sizes activation memory for:
    prefill of the whole context, whose num_logits_to_keep goes up to L (`check` keeps every row: 0 or L
    both give L rows), and decode of one token after it, which keeps at most 1."""
    return [(context, 0, context), (1, max(context - 1, 0), 1)]


def activation_terms(cfg: LlamaConfig, recipe: Recipe, *, batch: int, seq: int, past: int, keep: int) -> dict:
    """What one forward of `seq` new tokens on `past` cached ones holds, in bytes, by tensor of the graph
    (build.export; B = batch, S = seq, T = past + S, R = the logits rows kept, a = the activation dtype's bytes):
      logits    [B, R, V] float32: the graph's output, which the runtime allocates before the run
      cast      [B, R, V] in a: the output layer's result before its Cast to float32 (fp16 graphs; an fp32
                graph's output layer writes the logits itself)
      head_in   [B, R, D] in a: the final norm's kept rows, the output layer's input
      residual  [B, S, D] in a: the residual stream, live through every layer
      mask      the additive attention mask in a, made once and live through every layer: [B, 1, rep*S, T]
                in the concat form (tiled for its grouped query rows), [B, 1, S, T] in the in-place form,
                none in the CPU graph (GroupQueryAttention masks inside)
      scores    [B, H, S, T]: the portable graph's MatMul -> Add -> Softmax -> MatMul op by op holds two at
                once (an op's input and output), in a (no float32 detour); fused (TensorRT's MHA pattern,
                IAttention: not verified here) it holds none, so two is the bound. The CPU graph's
                GroupQueryAttention holds one float32 buffer (its softmax runs in place).
      mlp       [B, S, 4 * ffn] in a: the SwiGLU function body op by op (Split of gate_up [B, S, 2 ffn] into
                gate and up, then sigmoid, silu and their product; at most four ffn-wide tensors at once;
                the plugin holds three)
    Smaller tensors (q, k^T, rotary rows, the norms' float32 temporaries) are left out."""
    a, B, S, R = recipe.activation_bytes, batch, seq, keep
    T, V, D = past + seq, cfg.vocab_size, cfg.dim
    gqa = recipe.fused_attention(cfg)
    mask_rows = 0 if gqa else S if recipe.inplace_kv else cfg.n_rep * S
    return {"logits": B * R * V * 4, "cast": B * R * V * a if a != 4 else 0, "head_in": B * R * D * a,
            "residual": B * S * D * a, "mask": B * mask_rows * T * a,
            "scores": B * cfg.n_heads * S * T * (4 if gqa else 2 * a), "mlp": B * S * 4 * cfg.ffn_dim * a}


def activation_bytes(cfg: LlamaConfig, recipe: Recipe, *, batch: int, seq: int, past: int, keep: int) -> float:
    """The activation peak of one forward (activation_terms): the logits, which live through the whole run,
    plus the most held at once inside it: at a layer's attention (residual, mask, scores), at its MLP
    (residual, mask, the SwiGLU tensors) or at the output layer (its input and result)."""
    t = activation_terms(cfg, recipe, batch=batch, seq=seq, past=past, keep=keep)
    layer = t["residual"] + t["mask"] + max(t["scores"], t["mlp"])
    return float(t["logits"] + max(layer, t["head_in"] + t["cast"]))


def plan(cfg: LlamaConfig, profile: Profile, recipe: Recipe, *, context: int | None = None,
         batch: int | None = None) -> Plan:
    """The memory plan of one recipe. An accurate int4 recipe whose 8-bit projections do not fit
    falls back to the compact recipe (Recipe.as_compact) when that fits."""
    p = _plan(cfg, profile, recipe, context=context, batch=batch)
    if recipe.precision is Precision.INT4 and not recipe.compact and not p.fits:
        pure = _plan(cfg, profile, recipe.as_compact(), context=context, batch=batch)
        if pure.fits:
            return pure
    return p


def _plan(cfg: LlamaConfig, profile: Profile, recipe: Recipe, *, context, batch) -> Plan:
    ctx = cfg.max_seq_len if context is None else context
    b = profile.default_batch if batch is None else batch
    ctx, b = whole_number(ctx, "context (--max-seq-len)"), whole_number(b, "batch")
    act = recipe.activation_bytes
    stored, read = weight_bytes(cfg, recipe)
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * ctx * b * act
    acts = max(activation_bytes(cfg, recipe, batch=b, seq=s, past=p, keep=k) for s, p, k in profile_tokens(ctx))
    return Plan(recipe, stored, kv, acts, profile.workspace_gb * GiB, OVERHEAD[profile.backend], profile.budget_bytes,
                read + kv, profile.memory_bandwidth_gbs)


def plan_all(cfg: LlamaConfig, profile: Profile, recipes: Sequence[Recipe] | None = None, **kw) -> list[Plan]:
    """One plan per recipe (default: every precision of the profile, Recipe.every)."""
    return [plan(cfg, profile, r, **kw) for r in (Recipe.every(profile) if recipes is None else recipes)]


def choose(cfg: LlamaConfig, profile: Profile, recipes: Recipe | Sequence[Recipe], **kw) -> Plan:
    """The plan to build: the first of `recipes` (most accurate first: Recipe.candidates) that fits.
    Refuses, with the numbers and what would fit, before any work is done."""
    if isinstance(recipes, Recipe):
        recipes = [recipes]
    plans = [plan(cfg, profile, r, **kw) for r in recipes]
    for p in plans:
        if p.fits:
            return p
    if len(plans) == 1:
        p = plans[0]
        others = [plan(cfg, profile, p.recipe.with_precision(q), **kw)
                  for q in PREFERENCE + EXPLICIT_ONLY if q in profile.precisions]
        fitting = [str(q.precision) for q in others if q.fits]
        hint = (f"{', '.join(fitting)} fit{'s' if len(fitting) == 1 else ''}" if fitting
                else _nothing_fits(cfg, profile, others, **kw))
        raise LlamaExportError(f"{p.precision} needs {p.total / GiB:.1f} GiB on {profile.name} (weights "
                               f"{p.weights / GiB:.1f}, KV cache {p.kv_cache / GiB:.1f}, activations "
                               f"{p.activations / GiB:.1f}, workspace+runtime {(p.workspace + p.overhead) / GiB:.1f}) "
                               f"but the budget is {p.budget / GiB:.1f} GiB; {hint}")
    raise LlamaExportError(f"the model does not fit {profile.name} at any supported precision: smallest is "
                           f"{plans[-1].precision} at {plans[-1].total / GiB:.1f} GiB > budget "
                           f"{plans[-1].budget / GiB:.1f} GiB; {_nothing_fits(cfg, profile, plans, **kw)}")


def _nothing_fits(cfg, profile, plans, **kw) -> str:
    smallest = [p for p in plans if p.precision not in EXPLICIT_ONLY][-1]
    ctx = kw.get("context") or cfg.max_seq_len
    for c in (ctx // 2, ctx // 4, ctx // 8, 512):
        if c >= 256 and plan(cfg, profile, smallest.recipe, **{**kw, "context": c}).fits:
            return f"{smallest.precision} fits with --max-seq-len {c}"
    return "use a smaller model or a profile with more memory"


def plans_json(cfg: LlamaConfig, profile: Profile, plans: list[Plan], chosen: Plan | None, *, context: int,
               batch: int, error: str | None = None) -> dict:
    """The plan as plain data (`llamaexport plan --json`): every memory term of each precision in GiB,
    the budget, whether it fits, the decode ceiling, and the choice (None, with `error`, if none fits)."""
    def gib(v):
        return round(v / GiB, 4)

    return {
        "profile": profile.name, "backend": profile.backend, "memory_gib": profile.memory_gb,
        "reserved_gib": profile.reserved_gb, "budget_gib": gib(profile.budget_bytes),
        "bandwidth_gb_s": profile.memory_bandwidth_gbs, "parameters": cfg.n_params(),
        "context": context, "batch": batch,
        "plans": [{"precision": str(p.precision), "label": p.label, "weights_gib": gib(p.weights),
                   "kv_cache_gib": gib(p.kv_cache), "activations_gib": gib(p.activations),
                   "workspace_gib": gib(p.workspace), "runtime_gib": gib(p.overhead), "total_gib": gib(p.total),
                   "fits": p.fits, "bytes_per_token": p.bytes_per_token,
                   "decode_ceiling_tok_s": round(p.decode_ceiling, 2)} for p in plans],
        "choice": None if chosen is None else chosen.label,
        "error": error,
    }


def format_plans(cfg: LlamaConfig, profile: Profile, plans: list[Plan], chosen: Plan | None, *, context: int,
                 batch: int) -> str:
    head = (f"{profile.name}: {profile.backend}, budget {profile.budget_bytes / GiB:.1f} GiB "
            f"({profile.memory_gb:g} GiB - {profile.reserved_gb:g} reserved), {profile.memory_bandwidth_gbs:g} GB/s; "
            f"model {cfg.n_params() / 1e9:.2f}B params, context {context}, batch {batch}")
    cols = ("precision", "weights", "KV cache", "activations", "workspace", "runtime", "total", "fits", "decode ceiling")
    rows = [cols]
    for p in plans:
        rows.append((p.label, *(f"{v / GiB:.2f} GiB" for v in (p.weights, p.kv_cache, p.activations,
                                                                   p.workspace, p.overhead, p.total)),
                     "yes" if p.fits else "no", f"{p.decode_ceiling:.1f} tok/s"))
    w = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head] + ["  " + "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.append(f"choice: {chosen.label}" if chosen else "choice: none fits")
    return "\n".join(lines)

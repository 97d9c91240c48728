"""The memory planner: what a model needs on a profile, per precision, and what to build.

Adds up, for a batch and context length:
  weights      quantized matrices + their scales, embeddings, norms, rotary tables
  KV cache     2 x layers x KV heads x head_dim x context x batch x bytes
  activations  the prefill peak: logits [B, S, V] fp32, one layer's attention scores
               [B, H, S, T] fp32 and a few hidden-state buffers (S = T = the context)
  workspace    the TensorRT builder/runtime workspace from the profile
  overhead     runtime itself: CUDA context, cuBLAS and TensorRT (GPU), ONNX Runtime (CPU)
and compares the total with the profile's budget (memory - reserved for the OS/display).
The decode ceiling is bandwidth / bytes read per generated token (all weights once, plus the
KV cache at the full context): a memory-bound decode cannot beat it.
"""

from __future__ import annotations

import dataclasses

from . import LlamaExportError
from .config import LlamaConfig
from .export import EMBED_BLOCK, activation_dtype, lm_head_precision, quantized_embedding
from .quantize import CPU_8BIT_BLOCK, cpu_block, cpu_symmetric_8bit, resolve_blocks, tensor_precision
from .profiles import Profile

GiB = 2**30
# ordered from the most to the least accurate: `auto` takes the first that fits
PREFERENCE = ("fp32", "fp16", "int8", "int4")
EXPLICIT_ONLY = ("w8a8",)  # same memory as int8 and less accurate: planned, never chosen by auto
OVERHEAD = {"tensorrt": 0.75 * GiB, "onnxruntime": 0.25 * GiB}


@dataclasses.dataclass
class Plan:
    precision: str
    weights: float
    kv_cache: float
    activations: float
    workspace: float
    overhead: float
    budget: float
    bytes_per_token: float
    bandwidth_gbs: float
    protect: bool = True  # int4: the sensitive projections (quantize.INT4_8BIT_ROLES) and the CPU lm_head at
    # 8 bits (the accurate recipe); False: the compact recipe, all 4-bit

    @property
    def int4_recipe(self) -> str | None:
        """accurate | compact for int4 (--int4-recipe), None for the other precisions."""
        return None if self.precision != "int4" else "accurate" if self.protect else "compact"

    @property
    def label(self) -> str:
        return "int4 (compact)" if self.int4_recipe == "compact" else self.precision

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.workspace + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def decode_ceiling(self) -> float:
        return self.bandwidth_gbs * 1e9 / self.bytes_per_token


def _matrix_bytes(K: int, N: int, precision: str, target: str, block: int, model_precision: str,
                  lm_head: bool = False, block8: int = CPU_8BIT_BLOCK) -> float:
    """Stored bytes of a [K, N] linear. precision: the tensor's own; model_precision: the model's
    (it decides 8-bit zero points); lm_head: the output layer (its CPU block, see cpu_block)."""
    if precision == "fp32":
        return 4.0 * K * N
    if precision == "fp16":
        return 2.0 * K * N
    if target == "ort-cpu":  # MatMulNBits: K padded to whole blocks, fp32 scale per block, + zero points
        bits = 8 if precision == "int8" else 4
        block = cpu_block(precision, block, block8=block8, lm_head=lm_head)
        nb = -(-K // block)
        zero_points = 0 if bits == 8 and cpu_symmetric_8bit(model_precision) else nb if bits == 8 else -(-nb // 2)
        return N * (nb * block * bits / 8 + 4 * nb + zero_points)
    if precision in ("int8", "w8a8"):  # per-channel fp16 scales: negligible
        return 1.0 * K * N
    return (0.5 + 2.0 / block) * K * N  # int4: fp16 scale per block


def _act_bytes(precision: str, target: str) -> int:
    return 4 if activation_dtype(precision, target) == "float32" else 2


def weight_bytes(cfg: LlamaConfig, precision: str, *, target: str, block: int | None = None,
                 protect: bool = True) -> tuple[float, float]:
    """(bytes stored, bytes read per decoded token). block: --block-size (None: quantize.resolve_blocks)."""
    block, block8 = resolve_blocks(precision, protect, target, block)
    act = _act_bytes(precision, target)
    d, hd = cfg.dim, cfg.head_dim
    shapes = {"qkv_proj": (d, hd * (cfg.n_heads + 2 * cfg.n_kv_heads)), "o_proj": (hd * cfg.n_heads, d),
              "gate_up_proj": (d, 2 * cfg.ffn_dim), "down_proj": (cfg.ffn_dim, d)}  # [K, N]
    body = cfg.n_layers * sum(_matrix_bytes(K, N, tensor_precision(precision, role, target, protect), target,
                                            block, precision, block8=block8)
                              for role, (K, N) in shapes.items())
    emb = cfg.vocab_size * d * ((1 + 5 / EMBED_BLOCK)  # GatherBlockQuantized: uint8, fp32 scale + zero point
                                if quantized_embedding(precision, target, d) else act)
    head_prec = lm_head_precision(precision, target, protect)
    if head_prec is not None:   # a quantized lm_head copy
        head = _matrix_bytes(d, cfg.vocab_size, head_prec, target, block, precision, lm_head=True)
    else:
        head = 0 if cfg.tie_embeddings else cfg.vocab_size * d * act
    small = (2 * cfg.n_layers + 1) * d * 4 + 2 * cfg.max_seq_len * cfg.rope_dim // 2 * act
    stored = body + emb + head + small
    read = body + (head if head else emb) + small  # the embedding lookup reads one row
    return stored, read


def plan(cfg: LlamaConfig, profile: Profile, precision: str, *, context: int | None = None,
         batch: int | None = None, block: int | None = None, compact: bool = False) -> Plan:
    """int4 keeps its 8-bit projections when they fit, else falls back to the compact recipe (all
    4-bit); compact=True asks for the compact recipe (`--int4-recipe compact`). block: --block-size
    (None: each recipe's defaults, quantize.resolve_blocks)."""
    p = _plan(cfg, profile, precision, context=context, batch=batch, block=block,
              protect=not (compact and precision == "int4"))
    if precision == "int4" and not p.fits:
        pure = _plan(cfg, profile, precision, context=context, batch=batch, block=block, protect=False)
        if pure.fits:
            return pure
    return p


def _plan(cfg: LlamaConfig, profile: Profile, precision: str, *, context, batch, block, protect) -> Plan:
    ctx = context or cfg.max_seq_len
    b = batch or profile.default_batch
    target = profile.export_target
    act = _act_bytes(precision, target)
    stored, read = weight_bytes(cfg, precision, target=target, block=block, protect=protect)
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * ctx * b * act
    acts = (b * ctx * cfg.vocab_size * 4 + b * cfg.n_heads * ctx * ctx * 4
            + 4 * b * ctx * max(cfg.dim, 2 * cfg.ffn_dim) * act)
    workspace = float(profile.builder.get("workspace_gb", 0.0)) * GiB if profile.backend == "tensorrt" else 0.0
    return Plan(precision, stored, kv, acts, workspace, OVERHEAD[profile.backend], profile.budget_bytes,
                read + kv, profile.memory_bandwidth_gbs, protect)


def plan_all(cfg: LlamaConfig, profile: Profile, **kw) -> list[Plan]:
    return [plan(cfg, profile, p, **kw) for p in PREFERENCE + EXPLICIT_ONLY if p in profile.precisions]


def choose(cfg: LlamaConfig, profile: Profile, precision: str = "auto", **kw) -> Plan:
    """The plan to build: `precision` if it fits, or the most accurate that fits for `auto`.
    Refuses, with the numbers and what would fit, before any work is done."""
    plans = plan_all(cfg, profile, **kw)
    if precision != "auto":
        if precision not in profile.precisions:
            raise LlamaExportError(f"precision {precision} is not supported by profile {profile.name}; "
                                   f"choose one of {', '.join(profile.precisions)}")
        p = next(p for p in plans if p.precision == precision)
        if p.fits:
            return p
        fitting = [q.precision for q in plans if q.fits]
        hint = f"{', '.join(fitting)} fit{'s' if len(fitting) == 1 else ''}" if fitting else _nothing_fits(cfg, profile, plans, **kw)
        raise LlamaExportError(f"{precision} needs {p.total / GiB:.1f} GiB on {profile.name} (weights "
                               f"{p.weights / GiB:.1f}, KV cache {p.kv_cache / GiB:.1f}, activations "
                               f"{p.activations / GiB:.1f}, workspace+runtime {(p.workspace + p.overhead) / GiB:.1f}) "
                               f"but the budget is {p.budget / GiB:.1f} GiB; {hint}")
    for p in plans:
        if p.fits and p.precision not in EXPLICIT_ONLY:
            return p
    plans = [p for p in plans if p.precision not in EXPLICIT_ONLY]
    raise LlamaExportError(f"the model does not fit {profile.name} at any supported precision: smallest is "
                           f"{plans[-1].precision} at {plans[-1].total / GiB:.1f} GiB > budget "
                           f"{plans[-1].budget / GiB:.1f} GiB; {_nothing_fits(cfg, profile, plans, **kw)}")


def _nothing_fits(cfg, profile, plans, **kw) -> str:
    smallest = [p for p in plans if p.precision not in EXPLICIT_ONLY][-1]
    ctx = kw.get("context") or cfg.max_seq_len
    for c in (ctx // 2, ctx // 4, ctx // 8, 512):
        if c >= 256 and plan(cfg, profile, smallest.precision, **{**kw, "context": c}).fits:
            return f"{smallest.precision} fits with --max-seq-len {c}"
    return "use a smaller model or a profile with more memory"


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

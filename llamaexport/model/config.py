"""Model configuration: the LLaMA size table, Meta `params.json` and HF `config.json` readers.

Sizes are a literal table; everything else (head_dim, FFN width by the multiple-of rule) is
derived in `LlamaConfig.__post_init__`, which also validates and says how to fix a bad value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from llamaexport import LlamaExportError, whole_number

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = dict(_LLAMA3_ROPE, factor=32.0)

# name -> fields. `multiple_of` / `ffn_dim_multiplier` follow Meta's params.json rule.
SIZES: dict[str, dict[str, Any]] = {
    # LLaMA (Touvron et al. 2023, table 2): vocab 32000, eps 1e-6, context 2048
    "7B": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6, max_seq_len=2048),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6, max_seq_len=2048),
    "33B": dict(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6, max_seq_len=2048),
    "65B": dict(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-6, max_seq_len=2048),
    # LLaMA-2: context 4096, eps 1e-5; 70B uses GQA with 8 KV heads
    "llama2-7B": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "llama2-13B": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "llama2-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, max_seq_len=4096,
                       ffn_dim_multiplier=1.3, multiple_of=4096),
    # LLaMA-3 / 3.1 / 3.2: vocab 128256, rope theta 500000
    "llama3-8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                      ffn_dim=14336, rope_theta=500000.0, max_seq_len=8192),
    "llama3-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                       ffn_dim=28672, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        ffn_dim=14336, rope_theta=500000.0, max_seq_len=131072,
                        rope_scaling=_LLAMA3_ROPE),
    "llama3.1-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                         ffn_dim=28672, rope_theta=500000.0, max_seq_len=131072,
                         rope_scaling=_LLAMA3_ROPE),
    "llama3.2-1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        ffn_dim=8192, rope_theta=500000.0, max_seq_len=131072,
                        rope_scaling=_LLAMA32_ROPE, tie_embeddings=True),
    "llama3.2-3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                        ffn_dim=8192, rope_theta=500000.0, max_seq_len=131072,
                        rope_scaling=_LLAMA32_ROPE, tie_embeddings=True),
    # Benchmark shapes: TinyLlama-1.1B and SmolLM2-135M
    "1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048),
    "135M": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                 rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    # Tiny seeded configs for tests
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=512,
                 max_seq_len=256),
    "tiny-mha": dict(dim=64, n_layers=2, n_heads=4, ffn_dim=172, vocab_size=512, max_seq_len=256),
    "tiny-llama3": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=128, vocab_size=512,
                        max_seq_len=512, rope_theta=500000.0, tie_embeddings=True,
                        rope_scaling=dict(_LLAMA3_ROPE, original_max_position_embeddings=64)),
}



def inside(directory: Path, name: str) -> bool:
    """Whether the file name `name` stays inside `directory`: not absolute, no `..` out of it. Read as
    text, not resolved: a file that is a symlink (the Hugging Face cache's snapshots, deduplicated
    artifacts) is still the directory's own file."""
    norm = os.path.normpath(name)
    return not os.path.isabs(norm) and norm != ".." and not norm.startswith(".." + os.sep)

def ffn_width(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    ffn_dim: int | None = None           # derived from multiple_of / ffn_dim_multiplier if None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # {"rope_type": "llama3"|"linear", "factor": ...}
    head_dim: int | None = None          # dim // n_heads if None
    rope_dim: int | None = None          # rotated dims per head (partial rotary); head_dim if None
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self):
        """Derive the fields left None and validate. Frozen: a changed copy is dataclasses.replace(cfg, ...),
        which derives and validates again."""
        def derive(name, value):
            object.__setattr__(self, name, value)

        self._check_types()
        if self.n_kv_heads is None:
            derive("n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise LlamaExportError(
                    f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim explicitly")
            derive("head_dim", self.dim // self.n_heads)
        if self.ffn_dim is None:
            derive("ffn_dim", ffn_width(self.dim, self.multiple_of, self.ffn_dim_multiplier))
        if self.rope_dim is None:
            derive("rope_dim", self.head_dim)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            whole_number(getattr(self, name), f"config field {name}")
        if self.n_heads % self.n_kv_heads:
            raise LlamaExportError(
                f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} (grouped-query attention)")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise LlamaExportError(f"rope_dim {self.rope_dim} must be even and at most head_dim {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind in (None, "default"):
                derive("rope_scaling", None)
            elif kind not in ("llama3", "linear", "freq_factors"):
                raise LlamaExportError(
                    f"rope scaling type {kind!r} is not supported; supported: llama3, linear")
            else:
                derive("rope_scaling", dict(self.rope_scaling, rope_type=kind))

    def _check_types(self):
        """Types, ranges and finiteness of the given fields, before anything is derived from them."""
        def bad(name, want):
            raise LlamaExportError(f"config field {name} must be {want}, got {getattr(self, name)!r}")

        def positive_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

        required = ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of")
        for name in required + ("n_kv_heads", "ffn_dim", "head_dim", "rope_dim"):  # these four: None = derived
            v = getattr(self, name)
            if v is not None or name in required:  # stored as an int (a numpy integer is one too)
                object.__setattr__(self, name, whole_number(v, f"config field {name}"))
        for name in ("norm_eps", "rope_theta"):
            if not positive_number(getattr(self, name)):
                bad(name, "a finite number > 0")
        if self.ffn_dim_multiplier is not None and not positive_number(self.ffn_dim_multiplier):
            bad("ffn_dim_multiplier", "a finite number > 0")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            bad("rope_scaling", "an object")
        if not isinstance(self.tie_embeddings, bool):
            bad("tie_embeddings", "true or false")

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def n_params(self) -> int:
        d, f, h = self.dim, self.ffn_dim, self.head_dim
        per_layer = d * h * (self.n_heads * 2 + self.n_kv_heads * 2) + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def size_names() -> list[str]:
    return list(SIZES)


def config_for_size(size: str, **overrides) -> LlamaConfig:
    """The config for a named size (case-insensitive, e.g. `7B`, `llama3.2-1B`, `tiny`)."""
    by_lower = {k.lower(): k for k in SIZES}
    key = by_lower.get(size.strip().lower().replace("llama-", "llama").replace("_", "-"))
    if key is None:
        raise LlamaExportError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    fields = dict(SIZES[key])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaConfig(**fields)


def read_config(where: str, make) -> LlamaConfig:
    """make() -> a LlamaConfig read from `where` (a file), its one-line errors naming that file: a
    validation error, or a field of the wrong type that met int(), float() or a comparison."""
    try:
        return make()
    except LlamaExportError as e:
        raise e if where in str(e) else LlamaExportError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise LlamaExportError(f"{where}: a config field has the wrong type ({e})") from None


def _in_file(fn):
    """A config reader (path or dict, ...) whose errors name the file it reads (read_config)."""
    def reader(path_or_dict, *args, **kw):
        if isinstance(path_or_dict, dict):
            return fn(path_or_dict, *args, **kw)
        return read_config(str(path_or_dict), lambda: fn(path_or_dict, *args, **kw))
    reader.__doc__, reader.__name__ = fn.__doc__, fn.__name__
    return reader


@_in_file
def config_from_params_json(path: str | Path, *, vocab_size: int | None = None) -> LlamaConfig:
    """Meta's `params.json` (dim, n_layers, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier,
    norm_eps, rope_theta, use_scaled_rope, vocab_size; vocab_size -1 means "from the tokenizer")."""
    try:
        p = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlamaExportError(f"cannot read {path}: {e}; it must be Meta's params.json") from None
    if not isinstance(p, dict):
        raise LlamaExportError(f"params.json must be a JSON object, got {type(p).__name__}")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in p]
    if missing:
        raise LlamaExportError(f"{path} lacks {', '.join(missing)}; is this a LLaMA params.json?")
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        vocab = vocab_size or 32000
    rope_scaling = None
    if p.get("use_scaled_rope"):
        rope_scaling = dict(_LLAMA3_ROPE, factor=float(p.get("rope_scaling_factor", 8.0)))
    return LlamaConfig(
        dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads"),
        vocab_size=vocab, multiple_of=p.get("multiple_of", 256),
        ffn_dim_multiplier=p.get("ffn_dim_multiplier"), norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=float(p.get("rope_theta", 10000.0)), rope_scaling=rope_scaling,
        max_seq_len=p.get("max_seq_len", 131072 if rope_scaling else 4096),
    )


@_in_file
def config_from_hf(path_or_dict: str | Path | dict) -> LlamaConfig:
    """Hugging Face `config.json` of a LlamaForCausalLM (also Mistral-style llama configs)."""
    if isinstance(path_or_dict, dict):
        c = path_or_dict
    else:
        try:
            c = json.loads(Path(path_or_dict).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LlamaExportError(f"cannot read {path_or_dict}: {e}; it must be a HF config.json") from None
    if not isinstance(c, dict):
        raise LlamaExportError(f"config.json must be a JSON object, got {type(c).__name__}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in c]
    if missing:
        raise LlamaExportError(f"config.json lacks {', '.join(missing)}; is this a LlamaForCausalLM config?")
    archs = c.get("architectures") or []
    if c.get("model_type") not in (None, "llama") and not any("Llama" in a for a in archs):
        raise LlamaExportError(
            f"config model_type {c.get('model_type')!r} is not a LLaMA-family model; only llama is supported")
    if c.get("hidden_act", "silu") != "silu":
        raise LlamaExportError(f"hidden_act {c['hidden_act']!r} is not supported; LLaMA uses silu")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise LlamaExportError("attention_bias / mlp_bias checkpoints are not supported")
    # rope settings moved into `rope_parameters` in transformers 5
    rp = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    theta = c.get("rope_theta", rp.get("rope_theta", 10000.0))
    partial = c.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0))
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise LlamaExportError(f"config field partial_rotary_factor must be in (0, 1], got {partial!r}")
    cfg = LlamaConfig(
        dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
        ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta) if isinstance(theta, int) and not isinstance(theta, bool) else theta,
        rope_scaling=scaling, head_dim=c.get("head_dim") or None,  # None: hidden_size // num_attention_heads
        max_seq_len=c.get("max_position_embeddings", 2048),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
    return cfg if partial == 1.0 else dataclasses.replace(cfg, rope_dim=int(cfg.head_dim * partial))


def rope_inv_freq(cfg: LlamaConfig):
    """Inverse frequencies [rope_dim/2] (float64 numpy), with llama3 / linear scaling applied."""
    import numpy as np

    rd = cfg.rope_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "freq_factors":  # GGUF rope_freqs: per-frequency divisors (llama.cpp)
        return inv / np.asarray(s["factors"], dtype=np.float64)
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv / factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > old_ctx / low, inv / factor, blended)
    return np.where(wavelen < old_ctx / high, inv, out)


def rope_tables(cfg: LlamaConfig, n_positions: int | None = None):
    """cos, sin tables [n_positions, rope_dim/2] in float32 (computed in float64)."""
    import numpy as np

    n = n_positions or cfg.max_seq_len
    ang = np.outer(np.arange(n, dtype=np.float64), rope_inv_freq(cfg))
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

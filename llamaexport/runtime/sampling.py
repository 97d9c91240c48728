"""Next-token selection in numpy: greedy, temperature, top-k, top-p, repetition, presence and
frequency penalties.

Semantics follow Hugging Face `generate` so settings carry over: the repetition penalty divides
positive logits and multiplies negative ones of every token already seen (prompt included);
top-k keeps the k largest; top-p keeps the smallest set whose probability reaches p. The presence
and frequency penalties are OpenAI's: subtracted from the logits of tokens already generated
(not the prompt's), once, and once per occurrence; they apply before the repetition penalty.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real

import numpy as np

from llamaexport import LlamaExportError, whole_number


@dataclasses.dataclass
class SamplingConfig:
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's, -2 .. 2
    frequency_penalty: float = 0.0

    def __post_init__(self):
        """The one validation of sampling settings (the CLI, the Python API and the server build one)."""
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
                raise LlamaExportError(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise LlamaExportError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        whole_number(self.top_k, "top_k", at_least=0, note="0 = off")
        if not 0 < self.top_p <= 1:
            raise LlamaExportError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise LlamaExportError(f"{name} must be from -2 to 2 (0 = off), got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise LlamaExportError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None:
            whole_number(self.seed, "seed", at_least=0, at_most=2**63 - 1)


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def _penalized(self, logits: np.ndarray, seen, generated=None) -> np.ndarray:
        c = self.cfg
        rp, openai = c.repetition_penalty != 1.0 and seen is not None, c.presence_penalty or c.frequency_penalty
        openai = openai and generated is not None
        if not rp and not openai:
            return logits.astype(np.float32, copy=False)  # callers do not write to it
        x = logits.astype(np.float32, copy=True)
        for b, ids in enumerate(generated if openai else ()):
            ids, n = np.unique(np.asarray(ids, np.int64), return_counts=True)
            x[b, ids] -= n * c.frequency_penalty + c.presence_penalty
        for b, ids in enumerate(seen if rp else ()):
            ids = np.unique(ids)
            v = x[b, ids]
            x[b, ids] = np.where(v > 0, v / c.repetition_penalty, v * c.repetition_penalty)
        return x

    def distribution(self, logits: np.ndarray, seen: list[np.ndarray] | None = None, generated=None) -> np.ndarray:
        """The probabilities [B, V] that sampling draws from, after the penalties, temperature, top-k
        and top-p (temperature must be > 0)."""
        c = self.cfg
        x = self._penalized(logits, seen, generated) / c.temperature
        if c.top_k and c.top_k < x.shape[-1]:
            kth = np.partition(x, -c.top_k, axis=-1)[:, -c.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        x = x - x.max(-1, keepdims=True)
        p = np.exp(x)
        p /= p.sum(-1, keepdims=True)
        if c.top_p < 1.0:
            order = np.argsort(-p, axis=-1, kind="stable")
            sp = np.take_along_axis(p, order, -1)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            sp[(np.cumsum(sp, -1) - sp) >= c.top_p] = 0
            p = np.zeros_like(p)
            np.put_along_axis(p, order, sp, -1)
            p /= p.sum(-1, keepdims=True)
        return p

    def __call__(self, logits: np.ndarray, seen: list[np.ndarray] | None = None, generated=None) -> np.ndarray:
        """logits [B, V] -> token ids [B]; seen[b]: ids already in row b, prompt included (the
        repetition penalty); generated[b]: the ids row b generated (presence/frequency penalties)."""
        if self.cfg.temperature == 0:
            return self._penalized(logits, seen, generated).argmax(-1)
        p = self.distribution(logits, seen, generated)
        u = self.rng.random((p.shape[0], 1))
        return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)

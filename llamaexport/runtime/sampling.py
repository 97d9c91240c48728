"""Next-token selection in numpy: logit bias, greedy, temperature, top-k, top-p, repetition, presence and
frequency penalties; and the logprobs a generation reports (`token_logprobs`).

Semantics follow Hugging Face `generate` so settings carry over: the repetition penalty divides
positive logits and multiplies negative ones of every token already seen (prompt included);
top-k keeps the k largest; top-p keeps the smallest set whose probability reaches p. The presence
and frequency penalties are OpenAI's: subtracted from the logits of tokens already generated
(not the prompt's), once, and once per occurrence; they apply before the repetition penalty. The
logit bias is OpenAI's too: {token id: -100 .. 100} added to the logits before everything else (greedy
included), so -100 in effect bans a token and +100 forces it.

Logprobs are vLLM's default: the log-softmax of the RAW logits, before the bias, penalties, temperature
and any mask, i.e. the model's own distribution whatever the sampling settings.

A row may carry a grammar (runtime.constraint.Constraint, its mask filled): the order is logit bias,
penalties, then the grammar's mask (-inf on the refused ids, on a copy: the backend's logits are never
written), then temperature, top-k and top-p (or argmax). Rows without one are not touched.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Integral, Real

import numpy as np

from llamaexport import LlamaExportError, whole_number

# The most alternatives a generated token's logprobs list (OpenAI's top_logprobs bound).
MAX_TOP_LOGPROBS = 20
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: a bias is from -100 to 100


def check_logit_bias(bias, vocab_size: int | None = None) -> dict[int, float]:
    """A logit bias as {token id: bias}: keys are token ids (ints, or their decimal strings as JSON sends
    them) within the vocabulary (0 .. vocab_size - 1, when given), values numbers from -100 to 100. The
    error names the bad key."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise LlamaExportError(f"logit_bias must be an object mapping token ids to biases, got {type(bias).__name__}")
    out = {}
    for key, v in bias.items():
        k = key
        if isinstance(k, str) and k.strip().isdecimal():  # JSON object keys are strings
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 0 or (vocab_size is not None and k >= vocab_size):
            within = f" (0 .. {vocab_size - 1})" if vocab_size is not None else ""
            raise LlamaExportError(f"logit_bias key {str(key)[:40]!r} is not a token id of this model's vocabulary{within}")
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or abs(v) > LOGIT_BIAS_RANGE:
            raise LlamaExportError(f"logit_bias[{str(key)[:40]!r}] must be a number from -100 to 100, got {str(v)[:40]}")
        out[int(k)] = float(v)
    return out


@dataclasses.dataclass
class SamplingConfig:
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's, -2 .. 2
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> -100 .. 100, added to the logits first

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
        self.logit_bias = check_logit_bias(self.logit_bias) or None  # ids within the vocabulary: check_vocab

    def check_vocab(self, vocab_size: int):
        """The logit bias's ids are within a model's vocabulary (its logits' width)."""
        check_logit_bias(self.logit_bias, vocab_size)


@dataclasses.dataclass
class TokenLogprob:
    """One generated (or prompt) token's logprob and its `top` most likely alternatives, from the raw logits."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), most likely first (ties: lower id first)
    offset: int = 0  # where its text starts in the completion's text (set by runtime.completion.Completion)


def token_logprobs(logits: np.ndarray, tokens, top: int) -> list[TokenLogprob]:
    """The logprobs of `tokens` [B] under the raw logits [B, V] (log-softmax: no bias, penalty,
    temperature or mask), each with the `top` most likely ids. The one routine for the runtime's decode
    loop and the serving engine, called only for the rows that ask (the others compute nothing)."""
    x = np.asarray(logits, np.float32)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]  # [B]: log of the softmax's denominator
    out = []
    for b, t in enumerate(tokens):
        alts = []
        if top:
            k = min(top, x.shape[-1])
            ids = np.argpartition(-x[b], k - 1)[:k]               # the k largest, unordered
            ids = ids[np.lexsort((ids, -x[b, ids]))]              # most likely first, ties by id
            alts = [(int(i), float(x[b, i] - lse[b])) for i in ids]
        out.append(TokenLogprob(int(t), float(x[b, int(t)] - lse[b]), alts))
    return out


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        bias = cfg.logit_bias or {}
        self.bias_ids = np.fromiter(bias, np.int64, len(bias))                 # [n]
        self.bias = np.fromiter(bias.values(), np.float32, len(bias))         # [n]

    def _penalized(self, logits: np.ndarray, seen, generated=None, constraints=None) -> np.ndarray:
        """The logits [B, V] after the logit bias, the penalties and the masks of the rows' constraints
        (constraints[b]: a runtime.constraint.Constraint or None), in that order (a copy when any applies)."""
        c = self.cfg
        rp, openai = c.repetition_penalty != 1.0 and seen is not None, c.presence_penalty or c.frequency_penalty
        openai = openai and generated is not None
        masked = constraints is not None and any(k is not None for k in constraints)
        if not rp and not openai and not self.bias.size and not masked:
            return logits.astype(np.float32, copy=False)  # callers do not write to it
        x = logits.astype(np.float32, copy=True)
        x[:, self.bias_ids] += self.bias
        for b, ids in enumerate(generated if openai else ()):
            ids, n = np.unique(np.asarray(ids, np.int64), return_counts=True)
            x[b, ids] -= n * c.frequency_penalty + c.presence_penalty
        for b, ids in enumerate(seen if rp else ()):
            ids = np.unique(ids)
            v = x[b, ids]
            x[b, ids] = np.where(v > 0, v / c.repetition_penalty, v * c.repetition_penalty)
        for b, k in enumerate(constraints if masked else ()):
            if k is not None:
                k.apply(x[b])  # after the penalties: they never bring a -inf back
        return x

    def distribution(self, logits: np.ndarray, seen: list[np.ndarray] | None = None, generated=None,
                     constraints=None) -> np.ndarray:
        """The probabilities [B, V] that sampling draws from, after the penalties, the constraints' masks,
        temperature, top-k and top-p (temperature must be > 0)."""
        c = self.cfg
        x = self._penalized(logits, seen, generated, constraints) / c.temperature
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

    def __call__(self, logits: np.ndarray, seen: list[np.ndarray] | None = None, generated=None,
                 constraints=None) -> np.ndarray:
        """logits [B, V] -> token ids [B]; seen[b]: ids already in row b, prompt included (the
        repetition penalty); generated[b]: the ids row b generated (presence/frequency penalties);
        constraints[b]: row b's Constraint, its mask filled for this position, or None (unconstrained)."""
        if self.cfg.temperature == 0:
            return self._penalized(logits, seen, generated, constraints).argmax(-1)
        p = self.distribution(logits, seen, generated, constraints)
        u = self.rng.random((p.shape[0], 1))
        return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)

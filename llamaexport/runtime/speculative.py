"""Lossless speculative decoding: propose several next tokens cheaply, check them all in one forward of the
model, keep the longest prefix the model agrees with plus the model's own next token.

    spec = Speculation("ngram")                      # prompt lookup; or Speculation("draft", draft=DIR)
    for tok in model.steps([ids], speculative=spec):  # batch 1: tokens come one by one, several per forward
        ...

Two proposers:
  ngram  prompt lookup: the last n tokens of prompt + output (n from `ngram` down to `ngram_min`) are looked
         up in the earlier text; the tokens that followed their most recent occurrence are the draft. Free
         to compute; pays where the answer copies its input (summaries, answers from a text, code rewrites).
  draft  a smaller artifact with the same tokenizer (or a lower precision of the same model) decodes `k`
         tokens with its own KV cache, which follows the target's accepted text (resynchronised by common
         prefix, so rejected drafts are simply cut off).

Verification (`pick`): the model's forward over [last token, d1 .. dk] gives k + 1 rows of logits. Greedy, or a
deterministic draft (ngram): the token the target's own sampler picks at position i is kept, and drafting
goes on while it equals d_i+1, which is exactly plain decoding's choice (for sampling: P(accept d) = p(d), and
a rejection draws from p without d, renormalised: Leviathan et al.'s residual for a one-hot q). A sampled
draft (draft model, temperature > 0): d is accepted with probability min(1, p(d) / q(d)), else the token is
drawn from max(0, p - q) normalised; the output distribution is the target's (not the same random draws as
plain decoding with the same seed). p is the target sampler's distribution: logit bias, penalties over the
text so far (the accepted drafts included), the grammar's mask, temperature, top-k, top-p.

The KV cache is a runtime.slots SlotCache: the verify forward appends k + 1 positions, and the rejected ones
are cut with `truncate` (on the in-place cache a length, not a copy). ONNX Runtime's GroupQueryAttention takes
several new tokens over a past only at batch 1: speculation runs when one stream decodes (`steps` with one
prompt; in the serving engine, a step where a single request decodes), and a batch decodes as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError, whole_number

METHODS = ("ngram", "draft")
# Measured defaults (docs/performance.md, "Speculative decoding"): drafts of up to 4 tokens from n-grams of 3 down
# to 1 token. Longer drafts are accepted less often and each verified position costs compute; a one-token
# match proposes more often, and its rejections cost less than its acceptances gain.
DEFAULT_K = {"ngram": 4, "draft": 4}
DEFAULT_NGRAM = 3
DEFAULT_NGRAM_MIN = 1


@dataclasses.dataclass
class Speculation:
    """How to speculate. method "ngram" (prompt lookup) or "draft" (`draft`: an artifact directory or a loaded
    LlamaModel with the target's tokenizer); k: the most tokens drafted per forward (default 4);
    ngram / ngram_min: the longest and shortest suffix looked up."""

    method: str = "ngram"
    k: int | None = None
    ngram: int = DEFAULT_NGRAM
    ngram_min: int = DEFAULT_NGRAM_MIN
    draft: object = None  # str | Path | LlamaModel

    def __post_init__(self):
        if self.method not in METHODS:
            raise LlamaExportError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.k = DEFAULT_K[self.method] if self.k is None else whole_number(self.k, "speculative k", at_least=1,
                                                                             at_most=32)
        whole_number(self.ngram_min, "speculative ngram_min", at_least=1, at_most=16)
        whole_number(self.ngram, "speculative ngram", at_least=self.ngram_min, at_most=16)
        if self.method == "draft" and self.draft is None:
            raise LlamaExportError("speculative method 'draft' needs a draft artifact (--draft DIR)")
        if self.method == "ngram" and self.draft is not None:
            raise LlamaExportError("a draft artifact was given with speculative method 'ngram'; use method 'draft'")

    @classmethod
    def parse(cls, value, *, default: Speculation | None = None) -> Speculation | None:
        """A request's `speculative` field: None -> `default`; false -> off; true -> `default` or ngram;
        "ngram"; or {"method": "ngram", "k": 8, "ngram": 3, "ngram_min": 2} (a draft comes from the server's
        --draft only). LlamaExportError names the bad part."""
        if value is None:
            return default
        if value is False:
            return None
        if value is True:
            return default or cls()
        if isinstance(value, str):
            value = {"method": value}
        if not isinstance(value, dict):
            raise LlamaExportError('speculative must be true, false, "ngram", "draft" or {"method": ..., "k": ...}')
        unknown = set(value) - {"method", "k", "ngram", "ngram_min"}
        if unknown:
            raise LlamaExportError(f"speculative takes method, k, ngram and ngram_min, not {sorted(unknown)[0]!r}")
        method = value.get("method", default.method if default else "ngram")
        draft = None
        if method == "draft":
            if default is None or default.draft is None:
                raise LlamaExportError("speculative method 'draft' needs the server started with --draft DIR")
            draft = default.draft
        base = default if default is not None and default.method == method else None  # the server's settings
        ngram = value.get("ngram", base.ngram if base else DEFAULT_NGRAM)
        ngram_min = value.get("ngram_min", min(base.ngram_min if base else DEFAULT_NGRAM_MIN,
                                               ngram if isinstance(ngram, int) else DEFAULT_NGRAM))
        return cls(method, value.get("k", base.k if base else None), ngram, ngram_min, draft)


@dataclasses.dataclass
class SpecStats:
    """What speculation did over a generation (or a server's life)."""

    forwards: int = 0   # verify forwards run (each gave at least one token)
    drafted: int = 0    # tokens proposed
    accepted: int = 0   # proposed tokens the model agreed with
    tokens: int = 0     # tokens those forwards gave (accepted + one of the model's own each)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def add(self, drafted: int, accepted: int, tokens: int):
        self.forwards += 1
        self.drafted += drafted
        self.accepted += accepted
        self.tokens += tokens

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "drafted": self.drafted, "accepted": self.accepted, "tokens": self.tokens,
                "acceptance": round(self.acceptance, 4), "tokens_per_forward": round(self.tokens_per_forward, 4)}


# --- proposers ------------------------------------------------------------------------------------


class NgramProposer:
    """Prompt lookup over one sequence's ids (prompt + output, which only grows): an index from each n-gram
    (n = ngram_min .. ngram) to where its most recent occurrence ends, extended as the text grows."""

    def __init__(self, spec: Speculation):
        self.k, self.n_max, self.n_min = spec.k, spec.ngram, spec.ngram_min
        self.index: dict[tuple, int] = {}  # n-gram -> the position after its most recent occurrence
        self.indexed = 0  # n-grams ending before this position are in the index

    def propose(self, ids: Sequence[int], k: int | None = None, sampler=None) -> tuple[list[int], None]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix of ids
        (a deterministic draft: no q, whatever the sampler)."""
        k = self.k if k is None else k
        L = len(ids)
        # index every n-gram ending at positions < L - 1 (the suffix itself must not match itself)
        for end in range(self.indexed, L - 1):
            for n in range(self.n_min, self.n_max + 1):
                if end + 1 >= n:
                    self.index[tuple(ids[end + 1 - n:end + 1])] = end + 1
        self.indexed = max(self.indexed, L - 1)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            at = self.index.get(tuple(ids[L - n:]))
            if at is not None:
                return list(ids[at:at + k]), None
        return [], None


class DraftProposer:
    """A draft artifact decoding k tokens ahead with its own one-slot KV cache, which holds a prefix of the
    target's text: each propose() keeps the longest common prefix of what it holds and the text so far,
    feeds the rest, then decodes."""

    def __init__(self, draft, spec: Speculation, target_vocab: int):
        from llamaexport.runtime.slots import make_slots

        self.model, self.k = draft, spec.k
        self.slots = make_slots(draft.backend, 1)
        self.ids: list[int] = []  # the ids whose KV the draft's slot holds
        self.vocab = target_vocab
        self.ctx = draft.config.max_seq_len

    def propose(self, ids: Sequence[int], k: int | None = None, sampler=None) -> tuple[list[int], list | None]:
        """(drafts, their q distributions [V] each, or None when greedy)."""
        k = self.k if k is None else k
        k = min(k, self.ctx - len(ids) + 1)  # the draft's cache holds the text and all but the last draft
        if k <= 0:
            return [], None
        common = 0
        for a, b in zip(self.ids, ids[:-1]):  # the last id is always fed: its logits give the first draft
            if a != b:
                break
            common += 1
        self.slots.truncate(0, common)
        self.ids = self.ids[:common]
        logits = self.slots.prefill(0, list(ids[common:]))  # [V]
        self.ids = list(ids)
        drafts, qs = [], [] if sampler is not None and sampler.cfg.temperature > 0 else None
        for j in range(k):
            row = logits[:self.vocab]
            if row.shape[0] < self.vocab:  # a draft with a narrower (less padded) head: its extra ids never drafted
                row = np.concatenate([row, np.full(self.vocab - row.shape[0], -np.inf, row.dtype)])
            if qs is None:
                t = int(np.argmax(row))
            else:  # q: the draft's distribution under the target's temperature / top-k / top-p
                q = sampler.distribution(row[None])[0]
                t = int(sampler.rng.choice(q.shape[0], p=q))
                qs.append(q)
            drafts.append(t)
            if j == k - 1:
                break
            logits = self.slots.prefill(0, [t])
            self.ids.append(t)
        return drafts, qs

    def close(self):
        self.slots.close()


def load_draft(draft, target) -> object:
    """The draft LlamaModel (loading a directory), checked to share the target's tokenizer: the same vocabulary
    size, EOS ids, and ids for a probe text."""
    # the target's own class loads a directory (this module is below llama_model, which imports it)
    model = draft if _is_model(draft) else type(target).load(Path(draft), threads=target.backend.threads)
    tok, dtok = target.require_tokenizer(), model.tokenizer
    probe = "The draft's tokenizer must match: 12 apples, naive café, def f(x):\n    return x * 2"
    if dtok is None or dtok.vocab_size != tok.vocab_size or sorted(dtok.eos_ids) != sorted(tok.eos_ids) or \
            dtok.encode(probe, add_bos=False) != tok.encode(probe, add_bos=False):
        raise LlamaExportError(f"draft {getattr(model, 'dir', draft)} has another tokenizer than {target.dir}: a "
                               "draft must share the target's vocabulary (a smaller model of the same family, or "
                               "a lower precision of the same model)")
    if model.config.vocab_size < tok.vocab_size:
        raise LlamaExportError(f"draft {model.dir}: its logits cover {model.config.vocab_size} ids, fewer than the "
                               f"tokenizer's {tok.vocab_size}")
    return model


def _is_model(draft) -> bool:
    """A loaded LlamaModel (what a draft directory becomes), told apart from a path without importing it."""
    return hasattr(draft, "backend") and hasattr(draft, "tokenizer") and hasattr(draft, "config")


def make_proposer(spec: Speculation, target):
    """The proposer of a Speculation for a target LlamaModel (a draft directory is loaded once, into spec)."""
    if spec.method == "ngram":
        return NgramProposer(spec)
    if not _is_model(spec.draft):
        spec.draft = load_draft(spec.draft, target)
    return DraftProposer(spec.draft, spec, target.config.vocab_size)


# --- verification ---------------------------------------------------------------------------------


def fit_to_grammar(constraint, drafts: list[int], qs: list | None):
    """(drafts, qs, tail): the drafts the row's grammar accepts in a row (only they are worth a position in the
    forward), and, for a sampled draft cut there, its first refused draft and q as `tail`, which the position
    after the kept drafts must still verify (always rejected, p(d) = 0: the token then comes from the residual
    max(0, p - q), which plain sampling from p would not give). tail is None for a deterministic draft."""
    if constraint is None or not drafts:
        return drafts, qs, None
    cut = constraint.valid_prefix(drafts)
    tail = (drafts[cut], qs[cut]) if qs is not None and cut < len(drafts) else None
    return drafts[:cut], (qs[:cut] if qs is not None else None), tail


def position(drafts: list[int], qs: list | None, tail, i: int) -> tuple[int | None, object]:
    """(the draft, its q) that verified position i checks: a kept draft, the tail past them, or nothing."""
    if i < len(drafts):
        return drafts[i], None if qs is None else qs[i]
    return tail if tail is not None else (None, None)


def verified(sampler, logits: np.ndarray, drafts: list[int], qs, tail, constraint, *, seen: list[int],
             generated: list[int], penalize: bool, openai: bool, done):
    """The verify loop of one row: for positions i = 0, 1, ... of logits [len(drafts) + 1, V], pick the target's
    token (the draft's, tail's, of fit_to_grammar) and yield (i, token, hit, more): hit, the token is the
    draft there; more, the next position is verified too (hit, and done(token) is false). Each token is
    appended to `seen` (prompt + output: the repetition penalty) and `generated` (the presence and frequency
    penalties) before done() sees it. With a constraint, position 0's mask must be filled; the caller consumes
    each token before asking for the next (steps() through its own caller; the engine itself), and the mask
    of the next position is filled here."""
    for i in range(len(drafts) + 1):
        if constraint is not None and i:
            constraint.fill_mask()
        d, q = position(drafts, qs, tail, i)
        t = pick(sampler, logits[i], [np.asarray(seen, np.int64)] if penalize else None,
                 [generated] if openai else None, constraint, d, q)
        seen.append(t)
        generated.append(t)
        hit = i < len(drafts) and t == d
        more = hit and not done(t)
        yield i, t, hit, more
        if not more:
            return


def pick(sampler, row: np.ndarray, seen, generated, constraint, draft: int | None, q: np.ndarray | None) -> int:
    """The target's token at one verified position: row [V] its logits; draft the token proposed there (None:
    past the drafts, the model's bonus token); q the draft's distribution when the draft was sampled.
    seen / generated: the row's ids so far, prompt included / generated only (for the penalties), as one-row
    lists; constraint: the row's Constraint (its mask filled for this position) or None."""
    if draft is None or q is None or sampler.cfg.temperature == 0:
        # a deterministic draft: the target's own choice, kept when it equals the draft (see the module docstring)
        return int(sampler(row[None], seen, generated, [constraint])[0])
    p = sampler.distribution(row[None], seen, generated, [constraint])[0]
    if sampler.rng.random() * q[draft] < p[draft]:
        return draft
    residual = np.maximum(p - q[:p.shape[0]], 0)
    total = residual.sum()
    if total <= 0:  # p == q, where no draft is ever rejected: only rounding gets here
        return draft
    return int(sampler.rng.choice(residual.shape[0], p=residual / total))


__all__ = ["DraftProposer", "METHODS", "NgramProposer", "SpecStats", "Speculation", "fit_to_grammar", "load_draft",
           "make_proposer", "pick", "position", "verified"]

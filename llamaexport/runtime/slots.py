"""KV-cache slots: the serving engine's view of a backend's cache, one slot per running sequence.

`SlotCache` is what the engine's executor runs a step's plan over; `make_slots` picks the class that
follows the backend's `kv_form` (model.kv_form.KVForm):
  InplaceSlots  KVForm.INPLACE, one max-length buffer written in place (the CPU graph's
                GroupQueryAttention, the TensorRT >= 10.15 graph's TensorScatter): rows of one buffer
  ConcatSlots   KVForm.CONCAT, a cache that grows by Concat (the portable graph for TensorRT < 10.15):
                a cache per slot, left-padded into one batch per decode step
Both backends (runtime.llama_model's ONNX Runtime one, tensorrt.backend's) run rows of them and own
every tensor operation on their caches (numpy, or torch on the GPU); neither imports this module.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from llamaexport import LlamaExportError
from llamaexport.model.kv_form import KVForm


class SlotCache(Protocol):
    """What the engine's executor needs of a backend's cache split into `n` slots."""

    length: list[int]      # per slot: the positions its cache holds
    batched_prefill: bool  # prefill_rows runs its rows in one forward (else one by one: no gain in batching)

    def prefill(self, slot: int, ids: list[int], *, all_logits: bool = False) -> np.ndarray:
        """Append ids to one slot's cache; the last position's logits [V] (all_logits: every one's [n, V])."""

    def prefill_rows(self, lo: int, ids: list[list[int]]) -> np.ndarray:
        """The prompts (one length) of empty slots lo, lo+1, ...; the last logits of each [k, V]."""

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append one token to each slot (ascending slots); logits [len(slots), V]."""

    def truncate(self, slot: int, n: int) -> None:
        """Keep the first n positions of one slot's cache (n = 0: empty it)."""

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make slot dst hold the first n positions of slot src's cache (what dst held is dropped): the
        n choices of one request share their prompt's KV, computed once."""

    def close(self) -> None:
        """Let the caches go."""


class InplaceSlots:
    """KV-cache slots for the serving engine on a graph that writes a max-length buffer in place
    (KVForm.INPLACE: the CPU graph's GroupQueryAttention, the TensorRT graph's TensorScatter): one
    [n, kv_heads, ctx, head_dim] buffer per cache tensor, each row a slot. The backend owns the
    buffers and runs rows of them (slot_cache, run_slots, copy_slot_prefix); this class keeps each slot's
    length and builds the inputs.

    Both graphs write the new tokens of row b after its last real column of attention_mask (whose
    1s are its length), so a decode step binds the rows from the lowest to the highest decoding slot
    and every row keeps its own length. A row in that range that is not decoding (idle, or between
    prefill chunks) is fed a dummy token at its first free position, which its next write
    overwrites. Prefill chunks run with batch 1 on one row (GroupQueryAttention takes a chunk on top
    of a past only for batch 1)."""

    batched_prefill = True

    def __init__(self, backend, n: int):
        self.backend, self.ctx = backend, backend.cfg.max_seq_len
        self.state = backend.slot_cache(n)  # {"bufs": the cache buffers, ...: what the backend keeps with them}
        self.length = [0] * n

    @property
    def kv(self) -> list:
        """The cache buffers, one [n, kv_heads, ctx, head_dim] per cache tensor."""
        return self.state["bufs"]

    def truncate(self, slot: int, n: int):
        self.length[slot] = min(self.length[slot], n)

    def prefill(self, slot: int, ids: list[int], *, all_logits: bool = False) -> np.ndarray:
        start, n = self.length[slot], len(ids)
        if start + n > self.ctx:
            raise LlamaExportError(f"slot {slot} would hold {start + n} tokens, more than the context {self.ctx}")
        logits = self.backend.run_slots(self.state, slot, np.array([ids], np.int64), np.ones((1, start + n), np.int64),
                                        np.arange(start, start + n, dtype=np.int64)[None], all_logits=all_logits)
        self.length[slot] = start + n
        return logits[0]

    def copy_prefix(self, src: int, dst: int, n: int):
        if n > self.length[src]:
            raise LlamaExportError(f"slot {src} holds {self.length[src]} positions, not {n}")
        self.backend.copy_slot_prefix(self.state, src, dst, n)  # the buffers are the backend's (numpy or torch)
        self.length[dst] = n

    def prefill_rows(self, lo: int, ids: list[list[int]]) -> np.ndarray:
        """The prompts of empty slots lo, lo+1, ... (one length) in one batched forward: last logits [k, V]."""
        k, n = len(ids), len(ids[0])
        if any(self.length[s] for s in range(lo, lo + k)) or any(len(r) != n for r in ids) or n > self.ctx:
            raise LlamaExportError("prefill_rows takes empty slots and prompts of one length")
        logits = self.backend.run_slots(self.state, lo, np.array(ids, np.int64), np.ones((k, n), np.int64),
                                        np.broadcast_to(np.arange(n, dtype=np.int64), (k, n)).copy())
        for s in range(lo, lo + k):
            self.length[s] = n
        return logits

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        lo, hi = min(slots), max(slots)
        row_of = {s: r for r, s in enumerate(slots)}
        ids = np.zeros((hi - lo + 1, 1), np.int64)
        lens = []
        for s in range(lo, hi + 1):
            if s in row_of:
                ids[s - lo, 0] = tokens[row_of[s]]
            # no row is ever full: a request holds at most prompt + max_tokens - 1 < context positions
            # (Engine.submit), so the dummy token of an idle row also lands inside the buffer
            lens.append(self.length[s])
        T = max(lens) + 1
        mask = (np.arange(T)[None] <= np.array(lens)[:, None]).astype(np.int64)
        logits = self.backend.run_slots(self.state, lo, ids, mask, np.array(lens, np.int64)[:, None])
        for s in slots:
            self.length[s] += 1
        return logits[[s - lo for s in slots]]

    def close(self):
        self.state = {"bufs": []}


class ConcatSlots:
    """Slots for a backend whose cache grows by Concat (KVForm.CONCAT, the portable concat graph): each
    slot keeps its own [1, kv_heads, length, head_dim] tensors, and a decode step left-pads the rows to
    one length (the graph masks the padding through attention_mask and takes explicit positions). The
    backend pads and stacks the slots' caches (join_rows) and cuts a forward's presents back into them
    (split_rows), in its own tensors: host arrays, or torch on the GPU."""

    batched_prefill = False  # prefill_rows runs row by row (no batched forward on this form yet)

    def __init__(self, backend, n: int):
        self.backend = backend
        self.cache: list[list | None] = [None] * n
        self.length = [0] * n

    def truncate(self, slot: int, n: int):
        if n < self.length[slot]:
            self.length[slot] = n
            self.cache[slot] = [c[:, :, :n] for c in self.cache[slot]] if n else None  # [1, K, n, hd] views

    def prefill(self, slot: int, ids: list[int], *, all_logits: bool = False) -> np.ndarray:
        start = self.length[slot]
        past = self.cache[slot] if start else self.backend.empty_cache(1)
        n = len(ids)
        logits, present = self.backend.forward(np.array([ids], np.int64), np.ones((1, start + n), np.int64),
                                               np.arange(start, start + n, dtype=np.int64)[None], past,
                                               last_only=not all_logits)
        self.cache[slot], self.length[slot] = self.backend.split_rows(present, [start + n])[0], start + n
        return np.asarray(logits[0] if all_logits else logits[0, -1], np.float32)

    def copy_prefix(self, src: int, dst: int, n: int):
        """dst's cache: views of src's first n positions. A Concat cache is never written in place (every
        forward makes new presents, and truncate takes views too), so sharing the tensors is a copy that
        costs nothing."""
        if n > self.length[src]:
            raise LlamaExportError(f"slot {src} holds {self.length[src]} positions, not {n}")
        self.cache[dst] = [c[:, :, :n] for c in self.cache[src]] if n else None  # [1, K, n, hd] views
        self.length[dst] = n

    def prefill_rows(self, lo: int, ids: list[list[int]]) -> np.ndarray:
        """The prompts of empty slots lo, lo+1, ..., each prefilled alone: last logits [k, V]."""
        return np.stack([self.prefill(lo + r, row) for r, row in enumerate(ids)])

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        lens = [self.length[s] for s in slots]
        L = max(lens)
        mask = np.zeros((len(slots), L + 1), np.int64)
        for r, n in enumerate(lens):
            mask[r, L - n:] = 1  # row r: L - n padding columns, its n cached positions, the new token
        past = self.backend.join_rows([self.cache[s] for s in slots], L)  # [rows, K, L, hd] per tensor
        logits, present = self.backend.forward(np.array(tokens, np.int64)[:, None], mask,
                                               np.array(lens, np.int64)[:, None], past, last_only=True)
        # present [rows, K, L + 1, hd]: row r keeps its n + 1 real positions
        for s, cache in zip(slots, self.backend.split_rows(present, [n + 1 for n in lens])):
            self.cache[s] = cache
            self.length[s] += 1
        return np.asarray(logits[:, -1], np.float32)

    def close(self):
        self.cache = [None] * len(self.cache)


def make_slots(backend, n: int) -> SlotCache:
    """n serving slots over the backend's cache, in the form its graph keeps it (backend.kv_form)."""
    return InplaceSlots(backend, n) if backend.kv_form is KVForm.INPLACE else ConcatSlots(backend, n)

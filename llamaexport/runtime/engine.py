"""The serving engine: continuous batching over KV-cache slots, chunked prefill, prefix reuse.

    engine = Engine(model, max_batch=4)                   # model: a loaded LlamaModel
    for event in engine.stream(ids, max_new_tokens=64):   # TextEvent pieces, then one DoneEvent
        ...
    engine.submit(ids, max_new_tokens=64, on_event=f)     # from any thread; QueueFull past max_queue

The engine owns `max_batch` KV-cache slots. Each call of `step()`:
  1. admits queued requests into free slots. A request takes the idle slot whose cached tokens
     share the longest prefix with its prompt (llama.cpp's cache_prompt): those positions are not
     computed again, so a conversation that resends its history only prefills the new turn;
  2. prefills: while others decode, ONE forward of at most `prefill_chunk` tokens (several new
     requests in adjacent empty slots batched together, else a chunk of the oldest waiting
     prompt); with nobody decoding, every waiting prompt in full (new requests batched), so that
     they start decoding together;
  3. runs ONE batched forward that feeds every decoding sequence its last token, then samples
     each row with its own settings.
A decoding stream therefore waits at most one forward of `prefill_chunk` prompt tokens between two
of its tokens.
ONNX Runtime's GroupQueryAttention takes a prompt chunk on top of a cache only for batch 1 (it
refuses batch > 1 with sequence length > 1 and a past), hence prefill chunks and decode steps are
separate forwards.

Slots. A graph whose cache is one max-length buffer written in place (KVForm.INPLACE: the ONNX Runtime
CPU graph's GroupQueryAttention, the TensorRT >= 10.15 graph's TensorScatter, on either backend) gets
`runtime.slots.InplaceSlots`: one [max_batch, kv_heads, ctx, head_dim] buffer per tensor, each row a slot;
a decode step binds the rows from the lowest to the highest decoding slot and passes each row's own
length. A Concat cache (KVForm.CONCAT: the portable graph for TensorRT < 10.15) gets `ConcatSlots`:
per-slot caches, left-padded into one batch per decode step.

Threads: `start()` runs `step()` in a background thread (the server); without it, `stream()`
drives the steps itself (the chat REPL, tests). Events are delivered through each request's
`on_event` callback, called on the engine's thread. Only that thread touches the slots and the
running sequences; other threads submit, cancel and shut down through the queue, flags and `cond`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from llamaexport import LlamaExportError
from llamaexport.model.tokenizer import TextStream
from llamaexport.runtime.sampling import Sampler, SamplingConfig
from llamaexport.runtime.slots import make_slots


class QueueFull(LlamaExportError):
    """More requests are waiting than --max-queue allows."""


class ContextTooLong(LlamaExportError):
    """The prompt, or the prompt plus max_new_tokens, does not fit the context. `param`: which of the
    two to change ("prompt" or "max_tokens")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ShuttingDown(LlamaExportError):
    """The engine takes no new requests (shutdown() was called)."""


@dataclasses.dataclass
class TextEvent:
    text: str          # newly printable text (may be empty when only a token arrived)
    token_id: int


@dataclasses.dataclass
class DoneEvent:
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled" | "error"
    text: str           # the whole completion
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from an earlier request
    error: str | None = None


# Cached prompt prefixes shorter than this are recomputed rather than reused (see Engine._pick_slot).
MIN_REUSE = 8
# An idle engine waits this long after a request for others to join its first (batched) prefill.
GATHER_S = 0.005
# Tokens in one batched prefill forward of several new requests (bounds its activation memory).
BATCH_PREFILL_TOKENS = 256


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    on_event: Callable[[TextEvent | DoneEvent], None] | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False


@dataclasses.dataclass(eq=False)
class _Seq:
    req: Request
    slot: int
    pending: list[int]        # prompt ids still to prefill
    cached: int               # prompt ids found in the slot's cache
    stream: TextStream
    sampler: Sampler
    next_token: int | None = None  # sampled, emitted, not yet in the cache
    generated: list[int] = dataclasses.field(default_factory=list)


def check_limits(*, max_batch, max_queue, prefill_chunk):
    """The one validation of the engine's limits (the server calls it before loading the model)."""
    for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise LlamaExportError(f"{name} must be a whole number >= {lo}, got {v!r}")


class Engine:
    """Continuous batching over `max_batch` slots of one LlamaModel (see the module docstring)."""

    def __init__(self, model, *, max_batch: int = 4, max_queue: int = 16, prefill_chunk: int = 128):
        check_limits(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
        self.model = model
        self.tokenizer = model.require_tokenizer()
        self.ctx = model.config.max_seq_len
        limit = getattr(model.backend, "max_batch", None)  # a TensorRT engine's profiles bound its batch
        max_batch = min(max_batch, limit) if limit else max_batch
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.slots = make_slots(model.backend, max_batch)
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # ids whose KV each slot holds
        self.slot_used = [0.0] * max_batch
        self.active: dict[int, _Seq] = {}      # slot -> sequence
        self.queue: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancel_all = False
        self.steps = 0  # batched decode forwards run (tests read it)
        self.error: str | None = None

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop=(), eos_ids=None, on_event=None) -> Request:
        """Queue a generation. Raises LlamaExportError for a request that cannot run, QueueFull when
        --max-queue requests are already waiting."""
        n = len(prompt_ids)
        if n == 0:
            raise LlamaExportError("empty prompt: give at least one token")
        if n >= self.ctx:
            raise ContextTooLong(f"the prompt is {n} tokens but the model's context is {self.ctx} tokens; shorten it",
                                 "prompt")
        if n + max_new_tokens > self.ctx:
            raise ContextTooLong(f"the prompt ({n} tokens) plus max_tokens ({max_new_tokens}) is more than the "
                                 f"model's context ({self.ctx}); ask for at most {self.ctx - n} tokens", "max_tokens")
        req = Request(list(map(int, prompt_ids)), max_new_tokens, sampling or SamplingConfig(), tuple(stop),
                      frozenset(self.tokenizer.eos_ids if eos_ids is None else eos_ids), on_event)
        with self.cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down; retry on another instance")
            if self._thread is not None and not self._thread_running():
                raise ShuttingDown(self.error or "the engine has stopped")
            if len(self.active) + len(self.queue) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self.active)} requests are running and {len(self.queue)} waiting "
                                f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry shortly")
            self.queue.append(req)
            self.cond.notify_all()
        return req

    def cancel(self, req: Request):
        """Stop a request (a client went away); its slot is freed at the next step."""
        req.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def counts(self) -> tuple[int, int]:
        """(sequences in slots, requests waiting)."""
        return len(self.active), len(self.queue)

    # ------------------------------------------------------------------ driving
    def start(self):
        """Run the steps in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="llamaexport-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Serving: no thread (driven inline) or a live one, and not shutting down."""
        return not self._stopping and (self._thread is None or self._thread_running())

    def _loop(self):
        try:
            self._run_steps()
        except BaseException as e:  # noqa: BLE001 - the thread is ending: nobody may be left waiting
            self.error = f"the engine stopped: {_first_line(e)}"
            self._fail_all(self.error, queued=True)
            raise

    def _run_steps(self):
        while True:
            with self.cond:
                idle = not self.active
                while not self._stopping and not self.queue and not self.active:
                    self.cond.wait()
                if self._stopping and not self.queue and not self.active:
                    return
                if idle:  # requests sent together arrive a few ms apart: let them start together
                    deadline = time.monotonic() + GATHER_S
                    while len(self.queue) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self.cond.wait(left)
            self._guarded_step()

    def _guarded_step(self):
        """step(); a failure of the backend fails what is running, and the engine goes on serving."""
        try:
            self.step()
        except Exception as e:  # noqa: BLE001 - any backend error: it goes into the requests' answers
            self._fail_all(f"the model failed to run: {_first_line(e)}")

    def shutdown(self, grace: float = 5.0):
        """Stop taking requests; let running ones finish for `grace` seconds, then cancel them."""
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        deadline = time.monotonic() + grace
        while (self.active or self.queue) and time.monotonic() < deadline and self._thread_running():
            time.sleep(0.02)
        with self.cond:
            self._cancel_all = True  # the engine's own thread cancels at its next step (it owns `active`)
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=grace + 5)
        else:
            while self.active or self.queue:
                self._guarded_step()

    def _thread_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self):
        self.shutdown(grace=0)
        self.slots.close()

    def stream(self, prompt_ids: list[int], **kw) -> Iterator[TextEvent | DoneEvent]:
        """submit() and yield the request's events in order, ending with its DoneEvent. Drives the
        steps itself when no thread runs them. Closing the iterator early cancels the request."""
        import queue as q

        box: q.Queue = q.Queue()
        req = self.submit(prompt_ids, on_event=box.put, **kw)
        try:
            while True:
                if self._thread is None:
                    while box.empty():
                        self._guarded_step()
                ev = box.get()
                yield ev
                if isinstance(ev, DoneEvent):
                    return
        finally:
            if not req.done:
                self.cancel(req)
                if self._thread is None:
                    self._guarded_step()  # frees the slot now

    # ------------------------------------------------------------------ one step
    def step(self):
        """Admit, prefill (see _prefill), one batched decode step (see the module docstring)."""
        self._drop_cancelled()
        self._admit()
        decoding = [s for s in self.active.values() if s.next_token is not None]
        prefilling = [s for s in self.active.values() if s.pending]
        if prefilling:  # nobody waits for a token: start them all now; else one bounded forward
            self._prefill(prefilling, budget=self.prefill_chunk if decoding else None)
        if decoding:
            decoding.sort(key=lambda s: s.slot)
            tokens = [s.next_token for s in decoding]
            logits = self.slots.decode([s.slot for s in decoding], tokens)
            self.steps += 1
            for seq, tok, row in zip(decoding, tokens, logits):
                self.slot_tokens[seq.slot].append(tok)
                self._sample(seq, row)

    def _prefill(self, seqs: list[_Seq], budget: int | None):
        """Prefill waiting sequences: all of them (budget None, when nobody decodes: they then start
        decoding together), or one forward of at most `budget` tokens (others decode: this bounds their
        stall). New requests in adjacent empty slots share batched forwards (InplaceSlots.prefill_rows)
        over their common length, at most BATCH_PREFILL_TOKENS (or `budget`) tokens each; the rest
        (reused prefixes, longer prompts' tails) go one by one, oldest first."""
        rows = getattr(self.slots, "prefill_rows", None)
        cap = budget or BATCH_PREFILL_TOKENS
        for run in (self._fresh_runs(seqs) if rows is not None else []):
            n = min(min(len(s.pending) for s in run), cap)
            k = cap // n  # rows per forward
            for group in (run[i:i + k] for i in range(0, len(run), k)):
                if len(group) < 2:
                    break
                logits = rows(group[0].slot, [s.pending[:n] for s in group])
                for s, row in zip(group, logits):
                    self.slot_tokens[s.slot] += s.pending[:n]
                    s.pending = s.pending[n:]
                    if not s.pending:
                        self._sample(s, row)
                if budget is not None:
                    return
        for seq in sorted(seqs, key=lambda s: s.req.submitted):
            if seq.pending and seq.slot in self.active:
                chunk = seq.pending if budget is None else seq.pending[:budget]
                seq.pending = seq.pending[len(chunk):]
                logits = self.slots.prefill(seq.slot, chunk)
                self.slot_tokens[seq.slot] += chunk
                if not seq.pending:
                    self._sample(seq, logits)
                if budget is not None:
                    return

    def _fresh_runs(self, seqs: list[_Seq]) -> list[list[_Seq]]:
        """Runs of two or more waiting sequences in adjacent, still empty slots."""
        fresh = sorted((s for s in seqs if s.pending and self.slots.length[s.slot] == 0), key=lambda s: s.slot)
        runs: list[list[_Seq]] = []
        for seq in fresh:
            if runs and seq.slot == runs[-1][-1].slot + 1:
                runs[-1].append(seq)
            else:
                runs.append([seq])
        return [r for r in runs if len(r) > 1]

    def _drop_cancelled(self):
        with self.cond:
            if self._cancel_all:
                for r in [*self.queue, *(s.req for s in self.active.values())]:
                    r.cancelled = True
            gone = [r for r in self.queue if r.cancelled]
            for r in gone:
                self.queue.remove(r)
        for r in gone:
            self._finish_request(r, DoneEvent("cancelled", "", len(r.prompt_ids), 0, 0))
        for seq in [s for s in self.active.values() if s.req.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self):
        while len(self.active) < self.max_batch:
            with self.cond:
                if not self.queue:
                    return
                req = self.queue.popleft()
            slot, common = self._pick_slot(req.prompt_ids)
            self.slots.truncate(slot, common)
            del self.slot_tokens[slot][common:]
            self.slot_used[slot] = time.monotonic()
            self.active[slot] = _Seq(req, slot, req.prompt_ids[common:], common,
                                     TextStream(self.tokenizer, context=req.prompt_ids, stop=req.stop),
                                     Sampler(req.sampling))

    def _pick_slot(self, ids: list[int]) -> tuple[int, int]:
        """The idle slot sharing the longest prefix with `ids` (at most len - 1 tokens, so the
        last prompt token is computed for its logits). A prefix under MIN_REUSE tokens (a shared
        BOS) is not worth a slot's cache: then an empty slot before one holding a cached
        conversation, and among those the one that keeps the running sequences packed (a decode
        step computes every row from the lowest to the highest decoding slot; new requests in
        adjacent slots prefill in one batched forward), then the least recently used."""
        busy = list(self.active)
        best, best_key = None, None
        for s in range(self.max_batch):
            if s in self.active:
                continue
            have = self.slot_tokens[s]
            n = min(len(have), len(ids) - 1)
            common = next((i for i in range(n) if have[i] != ids[i]), n)
            if common < MIN_REUSE:
                common = 0
            span = max(busy + [s]) - min(busy + [s])
            key = (common, not have, -span, -self.slot_used[s], -s)
            if best_key is None or key > best_key:
                best, best_key = s, key
        return best, best_key[0]

    def _sample(self, seq: _Seq, logits: np.ndarray):
        req = seq.req
        seen = None
        if req.sampling.repetition_penalty != 1.0:
            seen = [np.asarray(req.prompt_ids + seq.generated, np.int64)]
        tok = int(seq.sampler(logits[None], seen, [seq.generated])[0])
        seq.generated.append(tok)
        if tok in req.eos_ids:
            return self._finish(seq, "stop")
        piece = seq.stream.push(tok)
        self._emit(req, TextEvent(piece, tok))
        if seq.stream.stopped:
            return self._finish(seq, "stop")
        if len(seq.generated) >= req.max_new_tokens:
            return self._finish(seq, "length")
        seq.next_token = tok

    def _emit(self, req: Request, ev):
        if req.on_event is not None and not req.cancelled:
            req.on_event(ev)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None):
        del self.active[seq.slot]
        self.slot_used[seq.slot] = time.monotonic()
        tail = seq.stream.finish() if reason != "cancelled" else ""
        if tail:
            self._emit(seq.req, TextEvent(tail, -1))
        self._finish_request(seq.req, DoneEvent(reason, seq.stream.text, len(seq.req.prompt_ids),
                                                len(seq.generated), seq.cached, error))

    def _finish_request(self, req: Request, ev: DoneEvent):
        req.done = True
        if req.on_event is not None:
            req.on_event(ev)

    def _fail_all(self, message: str, *, queued: bool = False):
        """End every running request (and with `queued`, every waiting one) with an error event."""
        self.error = message
        for seq in list(self.active.values()):
            self._finish(seq, "error", message)
            self.slots.truncate(seq.slot, 0)  # its cache may be half-written
            self.slot_tokens[seq.slot] = []
        if queued:
            with self.cond:
                waiting, self.queue = list(self.queue), collections.deque()
            for r in waiting:
                self._finish_request(r, DoneEvent("error", "", len(r.prompt_ids), 0, 0, message))


def _first_line(e: BaseException) -> str:
    return ((str(e).splitlines() or [""])[0] or type(e).__name__)[:300]

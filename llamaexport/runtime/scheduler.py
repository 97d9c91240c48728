"""The serving engine's scheduler: what each step runs, decided without a model (vLLM v1's shape).

    plan = scheduler.schedule()                            # StepPlan: admissions, prefill chunks, decode rows
    sampled = executor.execute(plan)                       # engine.Executor: the forwards; {request: token}
    events = scheduler.update_from_output(plan, sampled)   # tokens appended, requests finished

The scheduler owns the queue of waiting requests, the running ones (by slot) and what each KV-cache
slot holds (`Slot.tokens`: the ids whose KV its cache keeps, also after its request is done, for the
next one to reuse); the executor owns the caches and keeps them equal to that. Each schedule():
  1. drops cancelled requests (waiting or running: their slots are free again);
  2. admits waiting requests, oldest first, into free slots. A request takes the free slot whose cached
     ids share the longest prefix with its prompt (llama.cpp's cache_prompt): those positions are not
     computed again, so a conversation that resends its history only prefills the new turn;
  3. plans the prefill: while others decode, ONE forward of at most `prefill_chunk` prompt ids (several
     new requests in adjacent empty slots batched together, else a chunk of the oldest waiting prompt),
     so a decoding stream waits at most that between two of its tokens; with nobody decoding, every
     waiting prompt in full (new requests batched), so that they start decoding together;
  4. decodes every running request whose last sampled token is not in its cache yet, in one batched
     forward (rows by ascending slot).
update_from_output() records what the forwards put in the caches, then hands each sampled token to its
request's runtime.completion.Completion (EOS ids, stop strings, max_new_tokens), which says when it is
done; it returns the events to deliver (TextEvent pieces, one DoneEvent per request) instead of calling
anyone. Requests carry a status (RequestStatus).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from collections.abc import Callable

from llamaexport import LlamaExportError
from llamaexport.runtime.completion import Completion, FinishReason
from llamaexport.runtime.sampling import Sampler, SamplingConfig

# Cached prompt prefixes shorter than this are recomputed rather than reused (see Scheduler._pick_slot).
MIN_REUSE = 8
# Tokens in one batched prefill forward of several new requests (bounds its activation memory).
BATCH_PREFILL_TOKENS = 256


class QueueFull(LlamaExportError):
    """More requests are waiting than --max-queue allows."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"    # queued for a slot
    RUNNING = "running"    # in a slot: prefilling its prompt, then decoding
    FINISHED = "finished"  # over: its DoneEvent is delivered or on its way


@dataclasses.dataclass
class TextEvent:
    text: str          # newly printable text (may be empty when only a token arrived)
    token_id: int      # -1: the text held back until the end (no token)


@dataclasses.dataclass
class DoneEvent:
    finish_reason: FinishReason  # eos | stop | length | cancelled | error (runtime.completion)
    text: str           # the whole completion
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from an earlier request
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation from submit to its DoneEvent. Only the engine's thread changes it, but for
    `cancelled`, which any thread may set (the next schedule() ends the request)."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    completion: Completion  # its max_new_tokens, stop strings and EOS ids: the generated text and when it ends
    on_event: Callable[[TextEvent | DoneEvent], None] | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None        # the KV-cache slot it runs in
    cached: int = 0                # prompt ids found in that slot's cache at admission
    computed: int = 0              # prompt ids whose KV the slot holds (the cached ones included)
    next_token: int | None = None  # sampled and emitted, not in the cache yet: the next decode feeds it
    sampler: Sampler = dataclasses.field(init=False)

    def __post_init__(self):
        self.sampler = Sampler(self.sampling)  # its own random stream (seeded by sampling.seed)

    @property
    def done(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def generated(self) -> list[int]:
        """The ids sampled so far."""
        return self.completion.token_ids


Events = list[tuple[Request, TextEvent | DoneEvent]]  # what to deliver, in order: (request, event)


@dataclasses.dataclass
class Slot:
    """One KV-cache slot as the scheduler sees it (the cache itself is the executor's)."""

    tokens: list[int] = dataclasses.field(default_factory=list)  # ids whose KV its cache holds, in order
    used: float = 0.0  # when a request last entered or left it (the least recently used is taken first)


@dataclasses.dataclass
class Admission:
    request: Request
    slot: int
    reuse: int  # the slot's cached ids the request keeps: the executor cuts the cache to this length


@dataclasses.dataclass
class Prefill:
    """One prefill forward: requests in adjacent slots from requests[0].slot, request i fed ids[i] (one
    length when there are several: SlotCache.prefill_rows; one request: SlotCache.prefill)."""

    requests: list[Request]
    ids: list[list[int]]
    last: list[bool]  # ids[i] ends request i's prompt: its logits give the request's first token

    @property
    def slot(self) -> int:
        return self.requests[0].slot


@dataclasses.dataclass
class StepPlan:
    """One step's work (vLLM's SchedulerOutput), run in this order by the executor."""

    admitted: list[Admission]
    prefills: list[Prefill]
    decode: list[Request]  # ascending slots; each is fed its next_token
    finished: Events  # requests cancelled before the step: their DoneEvents


class Scheduler:
    """The queue, the slots and the running requests of an engine with `n_slots` KV-cache slots, and each
    step's plan (see the module docstring). It never touches a model: tests drive it with made-up tokens.
    The engine calls schedule(), add() and fail() under its lock (they touch the queue)."""

    def __init__(self, n_slots: int, *, max_queue: int, prefill_chunk: int, batched_prefill: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.n_slots, self.max_queue, self.prefill_chunk = n_slots, max_queue, prefill_chunk
        self.batched_prefill = batched_prefill  # the slot cache runs several prompts in one forward
        self.clock = clock
        self.slots = [Slot() for _ in range(n_slots)]
        self.running: dict[int, Request] = {}  # slot -> request, in admission order
        self.queue: collections.deque[Request] = collections.deque()

    # ------------------------------------------------------------------ requests
    def add(self, req: Request):
        """Queue a request; QueueFull when every slot is taken and --max-queue requests already wait."""
        if len(self.running) + len(self.queue) >= self.n_slots + self.max_queue:
            raise QueueFull(f"{len(self.running)} requests are running and {len(self.queue)} waiting "
                            f"(--max-batch {self.n_slots}, --max-queue {self.max_queue}); retry shortly")
        self.queue.append(req)

    def counts(self) -> tuple[int, int]:
        """(requests in slots, requests waiting)."""
        return len(self.running), len(self.queue)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.queue)

    def cancel_all(self):
        """Mark every request cancelled (shutdown): the next schedule() ends them."""
        for r in [*self.queue, *self.running.values()]:
            r.cancelled = True

    def fail(self, message: str, *, queued: bool = False) -> tuple[Events, list[int]]:
        """End every running request (and with `queued`, every waiting one) with an error. Returns the
        events and the slots whose caches must be emptied (a failed forward may have half-written them)."""
        events, slots = [], []
        for req in list(self.running.values()):
            events += self._finish(req, FinishReason.ERROR, message)
            self.slots[req.slot].tokens = []
            slots.append(req.slot)
        if queued:
            waiting, self.queue = list(self.queue), collections.deque()
            for r in waiting:
                r.status = RequestStatus.FINISHED
                events.append((r, DoneEvent(FinishReason.ERROR, "", len(r.prompt_ids), 0, 0, message)))
        return events, slots

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepPlan:
        """Drop the cancelled, admit, plan the prefill and the decode (see the module docstring)."""
        finished = self._drop_cancelled()
        admitted = self._admit()
        decode = sorted((r for r in self.running.values() if r.next_token is not None), key=lambda r: r.slot)
        waiting = [r for r in self.running.values() if r.computed < len(r.prompt_ids)]
        # nobody waits for a token: start every prompt now; else one forward of at most prefill_chunk ids
        prefills = self._plan_prefill(waiting, self.prefill_chunk if decode else None) if waiting else []
        return StepPlan(admitted, prefills, decode, finished)

    def update_from_output(self, plan: StepPlan, sampled: dict[Request, int]) -> Events:
        """Record what the plan's forwards put in the caches, then give each request its sampled token
        (`sampled`: a prompt's last chunk, or a decode row -> its token). Returns the events to deliver,
        in order."""
        for chunk in plan.prefills:
            for req, ids in zip(chunk.requests, chunk.ids):
                self.slots[req.slot].tokens += ids
                req.computed += len(ids)
        for req in plan.decode:
            self.slots[req.slot].tokens.append(req.next_token)
            req.next_token = None
        events = []
        for req, token in sampled.items():
            events += self._append(req, token)
        return events

    def _append(self, req: Request, token: int) -> Events:
        piece = req.completion.push(token)  # None: an EOS id, which is no text
        events = [] if piece is None else [(req, TextEvent(piece, token))]
        if req.completion.reason is None:
            req.next_token = token
            return events
        return events + self._finish(req, req.completion.reason)

    def _finish(self, req: Request, reason: FinishReason, error: str | None = None) -> Events:
        """Free the request's slot (its cache stays, for a later prompt to reuse); its last events."""
        del self.running[req.slot]
        self.slots[req.slot].used = self.clock()
        req.status = RequestStatus.FINISHED
        events = []
        tail = req.completion.finish() if reason is not FinishReason.CANCELLED else ""
        if tail:
            events.append((req, TextEvent(tail, -1)))
        done = DoneEvent(reason, req.completion.text, len(req.prompt_ids), len(req.generated), req.cached, error)
        return events + [(req, done)]

    def _drop_cancelled(self) -> Events:
        gone = [r for r in self.queue if r.cancelled]
        events = []
        for r in gone:
            self.queue.remove(r)
            r.status = RequestStatus.FINISHED
            events.append((r, DoneEvent(FinishReason.CANCELLED, "", len(r.prompt_ids), 0, 0)))
        for req in [r for r in self.running.values() if r.cancelled]:
            events += self._finish(req, FinishReason.CANCELLED)
        return events

    def _admit(self) -> list[Admission]:
        admitted = []
        while len(self.running) < self.n_slots and self.queue:
            req = self.queue.popleft()
            slot, reuse = self._pick_slot(req.prompt_ids)
            del self.slots[slot].tokens[reuse:]
            self.slots[slot].used = self.clock()
            req.status, req.slot, req.cached, req.computed = RequestStatus.RUNNING, slot, reuse, reuse
            self.running[slot] = req
            admitted.append(Admission(req, slot, reuse))
        return admitted

    def _pick_slot(self, ids: list[int]) -> tuple[int, int]:
        """The free slot sharing the longest prefix with `ids` (at most len - 1 tokens, so the
        last prompt token is computed for its logits), and that prefix's length. A prefix under
        MIN_REUSE tokens (a shared BOS) is not worth a slot's cache: then an empty slot before one
        holding a cached conversation, and among those the one that keeps the running requests packed
        (a decode step computes every row from the lowest to the highest decoding slot; new requests
        in adjacent slots prefill in one batched forward), then the least recently used."""
        busy = list(self.running)
        best, best_key = None, None
        for s, slot in enumerate(self.slots):
            if s in self.running:
                continue
            have = slot.tokens
            n = min(len(have), len(ids) - 1)
            common = next((i for i in range(n) if have[i] != ids[i]), n)
            if common < MIN_REUSE:
                common = 0
            span = max(busy + [s]) - min(busy + [s])
            key = (common, not have, -span, -slot.used, -s)
            if best_key is None or key > best_key:
                best, best_key = s, key
        return best, best_key[0]

    def _plan_prefill(self, waiting: list[Request], budget: int | None) -> list[Prefill]:
        """The prefill forwards: all of the waiting prompts (budget None) or one forward of at most
        `budget` ids. New requests in adjacent empty slots share batched forwards over their common
        length, at most BATCH_PREFILL_TOKENS (or `budget`) ids each; the rest (reused prefixes, longer
        prompts' tails) go one by one, oldest first."""
        left = {r: len(r.prompt_ids) - r.computed for r in waiting}  # prompt ids not planned yet
        plan: list[Prefill] = []
        cap = budget or BATCH_PREFILL_TOKENS
        for run in (self._fresh_runs(waiting) if self.batched_prefill else []):
            n = min(min(left[r] for r in run), cap)
            k = cap // n  # rows per forward
            for group in (run[i:i + k] for i in range(0, len(run), k)):
                if len(group) < 2:
                    break
                plan.append(self._chunk(group, n, left))
                if budget is not None:
                    return plan
        for req in sorted(waiting, key=lambda r: r.submitted):
            if left[req]:
                plan.append(self._chunk([req], left[req] if budget is None else min(budget, left[req]), left))
                if budget is not None:
                    return plan
        return plan

    @staticmethod
    def _chunk(group: list[Request], n: int, left: dict[Request, int]) -> Prefill:
        """The next n prompt ids of each request in `group` as one forward."""
        ids, last = [], []
        for r in group:
            start = len(r.prompt_ids) - left[r]
            ids.append(r.prompt_ids[start:start + n])
            last.append(left[r] == n)
            left[r] -= n
        return Prefill(list(group), ids, last)

    def _fresh_runs(self, waiting: list[Request]) -> list[list[Request]]:
        """Runs of two or more waiting requests in adjacent, still empty slots."""
        fresh = sorted((r for r in waiting if not self.slots[r.slot].tokens), key=lambda r: r.slot)
        runs: list[list[Request]] = []
        for req in fresh:
            if runs and req.slot == runs[-1][-1].slot + 1:
                runs[-1].append(req)
            else:
                runs.append([req])
        return [r for r in runs if len(r) > 1]

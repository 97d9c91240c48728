"""The serving engine's scheduler: what each step runs, decided without a model (vLLM v1's shape).

    plan = scheduler.schedule()                            # StepPlan: admissions, prefill chunks, decode rows
    out = executor.execute(plan)                           # engine.Executor: the forwards; StepOutput
    events = scheduler.update_from_output(plan, out.tokens, out.logprobs, out.prompt_logprobs)

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

A request for n choices (the API's n) is a group: its leader and n - 1 followers, queued as one entry and
admitted together into n slots (or not yet: the queue stays in order). Only the leader's prompt is
prefilled; in the step of its last chunk the plan copies the leader's cache into each follower's slot
(`Copy`: SlotCache.copy_prefix), and each follower samples its first token from the leader's logits with
its own sampler, then decodes as any request. A request that reports its prompt's logprobs (the API's
echo with logprobs) reuses no cached prefix and is prefilled alone, in chunks of at most prefill_chunk ids
whose every position's logits the executor keeps (`Prefill.keep_logits`).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from collections.abc import Callable

from llamaexport import LlamaExportError
from llamaexport.runtime.completion import Completion, FinishReason
from llamaexport.runtime.sampling import Sampler, SamplingConfig, TokenLogprob

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


PromptLogprobs = list[TokenLogprob | None]  # a prompt's tokens' logprobs; the first is None (nothing before it)


@dataclasses.dataclass
class TextEvent:
    text: str          # newly printable text (may be empty when only a token arrived)
    token_id: int      # -1: the text held back until the end (no token)
    # with logprobs asked: those of the tokens whose text starts showing with this event (Completion), which
    # may be earlier tokens' (text held back for a stop string or an unfinished UTF-8 character)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    index: int = 0     # the choice it belongs to (a request for n choices)
    prompt_logprobs: PromptLogprobs | None = None  # on a choice's first event, when its prompt's were asked


@dataclasses.dataclass
class DoneEvent:
    finish_reason: FinishReason  # eos | stop | length | cancelled | error (runtime.completion)
    text: str           # the whole completion
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from an earlier request
    error: str | None = None
    index: int = 0      # the choice it ends (a request for n choices)
    logprobs: list[TokenLogprob] | None = None        # with logprobs asked: every reported token's, in order
    prompt_logprobs: PromptLogprobs | None = None     # with the prompt's asked


@dataclasses.dataclass(eq=False)
class Request:
    """One generation from submit to its DoneEvent. Only the engine's thread changes it, but for
    `cancelled`, which any thread may set (the next schedule() ends the request)."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    completion: Completion  # its max_new_tokens, stop strings and EOS ids: the generated text and when it ends
    on_event: Callable[[TextEvent | DoneEvent], None] | None = None
    logprobs: int | None = None    # report each token's logprob with this many alternatives (None: no logprobs)
    prompt_logprobs: bool = False  # and the prompt's tokens' (computed from every prefill position's logits)
    index: int = 0                 # its choice among its group's
    followers: list[Request] = dataclasses.field(default_factory=list)  # the group's other choices (a leader's)
    leader: Request | None = None  # a follower's leader: its slot's cache is copied from the leader's
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None        # the KV-cache slot it runs in
    cached: int = 0                # prompt ids found in that slot's cache at admission
    computed: int = 0              # prompt ids whose KV the slot holds (the cached ones included)
    next_token: int | None = None  # sampled and emitted, not in the cache yet: the next decode feeds it
    prompt_lps: PromptLogprobs = dataclasses.field(default_factory=list)  # a leader's, as its prefill computes them
    speculative: object = None     # runtime.speculative.Speculation: draft and verify when it decodes alone
    proposer: object = None        # its prompt-lookup state (the executor's, made at its first speculative step)
    sampler: Sampler = dataclasses.field(init=False)

    @property
    def constraint(self):
        """Its grammar's state (runtime.constraint.Constraint; None: unconstrained), which its Completion
        advances; the executor fills its mask and the sampler applies it."""
        return self.completion.constraint

    def __post_init__(self):
        self.sampler = Sampler(self.sampling)  # its own random stream (seeded by sampling.seed)

    @property
    def done(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def generated(self) -> list[int]:
        """The ids sampled so far."""
        return self.completion.token_ids

    @property
    def group(self) -> list[Request]:
        """A leader and its followers (n choices), else the request alone."""
        return [self, *self.followers]

    @property
    def all_done(self) -> bool:
        return all(r.done for r in self.group)


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
    starts: list[int]  # where ids[i] starts in request i's prompt

    @property
    def slot(self) -> int:
        return self.requests[0].slot

    @property
    def keep_logits(self) -> bool:
        """Every position's logits are needed: the one request reports its prompt's logprobs."""
        return len(self.requests) == 1 and self.requests[0].prompt_logprobs


@dataclasses.dataclass
class Copy:
    """A follower's slot gets its leader's prompt cache (SlotCache.copy_prefix), once the leader's last
    prefill chunk ran; the follower samples its first token from the leader's logits."""

    src: int  # the leader's slot
    dst: int  # the follower's
    n: int    # positions: the prompt
    request: Request  # the follower
    leader: Request


@dataclasses.dataclass
class StepPlan:
    """One step's work (vLLM's SchedulerOutput), run in this order by the executor."""

    admitted: list[Admission]
    prefills: list[Prefill]
    decode: list[Request]  # ascending slots; each is fed its next_token
    finished: Events  # requests cancelled before the step: their DoneEvents
    copies: list[Copy] = dataclasses.field(default_factory=list)  # after the prefills, before the decode


@dataclasses.dataclass
class StepOutput:
    """What a plan's forwards gave (vLLM's ModelRunnerOutput)."""

    # a prompt's last chunk, a copy's follower, a decode row -> its sampled token; a speculative decode row ->
    # its verified tokens, in order (the accepted drafts, then the model's own)
    tokens: dict[Request, int | list[int]]
    # of those that ask (a list where tokens is one)
    logprobs: dict[Request, TokenLogprob | list[TokenLogprob]] = dataclasses.field(default_factory=dict)
    prompt_logprobs: dict[Request, PromptLogprobs] = dataclasses.field(default_factory=dict)  # this step's
    # a speculative decode row -> the drafts its forward fed after next_token and kept in the cache
    accepted: dict[Request, list[int]] = dataclasses.field(default_factory=dict)


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
        """Queue a request (with its followers: one entry); QueueFull when every slot is taken and
        --max-queue requests already wait."""
        running, waiting = self.counts()
        if len(req.group) > self.n_slots:
            raise LlamaExportError(f"{len(req.group)} choices need as many slots; there are {self.n_slots}")
        if running + waiting + len(req.group) > self.n_slots + self.max_queue:
            raise QueueFull(f"{running} requests are running and {waiting} waiting "
                            f"(--max-batch {self.n_slots}, --max-queue {self.max_queue}); retry shortly")
        self.queue.append(req)

    def counts(self) -> tuple[int, int]:
        """(requests in slots, requests waiting): each of n choices counts."""
        return len(self.running), sum(len(r.group) for r in self.queue)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.queue)

    def cancel_all(self):
        """Mark every request cancelled (shutdown): the next schedule() ends them."""
        for r in [*(f for q in self.queue for f in q.group), *self.running.values()]:
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
            for r in (f for q in waiting for f in q.group):
                r.status = RequestStatus.FINISHED
                events.append((r, DoneEvent(FinishReason.ERROR, "", len(r.prompt_ids), 0, 0, message, r.index)))
        return events, slots

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepPlan:
        """Drop the cancelled, admit, plan the prefill and the decode (see the module docstring)."""
        finished = self._drop_cancelled()
        admitted = self._admit()
        decode = sorted((r for r in self.running.values() if r.next_token is not None), key=lambda r: r.slot)
        # followers are never prefilled: their slots get a copy of their leader's cache
        waiting = [r for r in self.running.values() if r.leader is None and r.computed < len(r.prompt_ids)]
        # nobody waits for a token: start every prompt now; else one forward of at most prefill_chunk ids
        prefills = self._plan_prefill(waiting, self.prefill_chunk if decode else None) if waiting else []
        copies = [Copy(lead.slot, f.slot, len(lead.prompt_ids), f, lead)
                  for chunk in prefills for lead, last in zip(chunk.requests, chunk.last) if last
                  for f in lead.followers if f.status is RequestStatus.RUNNING]
        return StepPlan(admitted, prefills, decode, finished, copies)

    def update_from_output(self, plan: StepPlan, sampled: dict[Request, int | list[int]],
                           logprobs: dict[Request, TokenLogprob | list[TokenLogprob]] | None = None,
                           prompt_logprobs: dict[Request, PromptLogprobs] | None = None,
                           accepted: dict[Request, list[int]] | None = None) -> Events:
        """Record what the plan's forwards put in the caches, then give each request its sampled token
        (`sampled`: a prompt's last chunk, a copy's follower, or a decode row -> its token, or a speculative
        row's tokens in order, given one by one until its Completion ends it; `logprobs`: those tokens' for
        the requests that report them; `prompt_logprobs`: prompt tokens' computed this step; `accepted`: a
        speculative row's drafts its forward kept in the cache after next_token). Returns the events to
        deliver, in order."""
        for chunk in plan.prefills:
            for req, ids in zip(chunk.requests, chunk.ids):
                self.slots[req.slot].tokens += ids
                req.computed += len(ids)
        for c in plan.copies:
            self.slots[c.dst].tokens = self.slots[c.src].tokens[:c.n]
            c.request.computed = c.n
        for req in plan.decode:
            self.slots[req.slot].tokens += [req.next_token, *(accepted or {}).get(req, ())]
            req.next_token = None
        for req, lps in (prompt_logprobs or {}).items():
            req.prompt_lps += lps
        events = []
        for req, tokens in sampled.items():
            lps = (logprobs or {}).get(req)
            if isinstance(tokens, int):
                tokens, lps = [tokens], [lps]
            for token, lp in zip(tokens, lps or [None] * len(tokens)):
                events += self._append(req, token, lp)
                if req.done:  # a stop string, EOS or the length within the verified tokens: the rest are dropped
                    break
        return events

    def _append(self, req: Request, token: int, logprob: TokenLogprob | None) -> Events:
        piece = req.completion.push(token, logprob)  # None: an EOS id, which is no text
        first = len(req.generated) == 1
        events = []
        if piece is not None:
            lps = req.completion.take_logprobs() if req.logprobs is not None else []
            events.append((req, TextEvent(piece, token, lps, req.index, self._prompt_lps(req) if first else None)))
        if req.completion.reason is None:
            req.next_token = token
            return events
        return events + self._finish(req, req.completion.reason, req.completion.error)

    @staticmethod
    def _prompt_lps(req: Request) -> PromptLogprobs | None:
        """The prompt's logprobs, for a request that asked (a follower's are its leader's)."""
        return (req.leader or req).prompt_lps if req.prompt_logprobs else None

    def _finish(self, req: Request, reason: FinishReason, error: str | None = None) -> Events:
        """Free the request's slot (its cache stays, for a later prompt to reuse); its last events."""
        del self.running[req.slot]
        self.slots[req.slot].used = self.clock()
        req.status = RequestStatus.FINISHED
        events = []
        tail = req.completion.finish() if reason is not FinishReason.CANCELLED else ""
        lps = req.completion.take_logprobs() if req.logprobs is not None and reason is not FinishReason.CANCELLED else []
        if tail or lps:
            events.append((req, TextEvent(tail, -1, lps, req.index)))
        done = DoneEvent(reason, req.completion.text, len(req.prompt_ids), len(req.generated), req.cached, error,
                         req.index, req.completion.logprobs if req.logprobs is not None else None, self._prompt_lps(req))
        return events + [(req, done)]

    def _drop_cancelled(self) -> Events:
        """End the cancelled requests. A queued group goes whole with its leader; a leader cancelled before
        its followers got its cache takes them along (they would wait for it forever)."""
        gone = [r for r in self.queue if r.cancelled]
        events = []
        for lead in gone:
            self.queue.remove(lead)
            for r in lead.group:
                r.status = RequestStatus.FINISHED
                events.append((r, DoneEvent(FinishReason.CANCELLED, "", len(r.prompt_ids), 0, 0, None, r.index)))
        for lead in self.running.values():
            if lead.cancelled and lead.computed < len(lead.prompt_ids):
                for f in lead.followers:
                    f.cancelled = True
        for req in [r for r in self.running.values() if r.cancelled]:
            events += self._finish(req, FinishReason.CANCELLED)
        return events

    def _admit(self) -> list[Admission]:
        """Waiting requests into free slots, oldest first; a group only when all of it fits (the requests
        behind it wait too: the queue keeps its order)."""
        admitted = []
        while self.queue and len(self.running) + len(self.queue[0].group) <= self.n_slots:
            for req in self.queue.popleft().group:
                # a follower's slot gets a copy of its leader's cache; a prompt's logprobs need every position
                reuse_ok = req.leader is None and not req.prompt_logprobs
                slot, reuse = self._pick_slot(req.prompt_ids, reuse=reuse_ok)
                del self.slots[slot].tokens[reuse:]
                self.slots[slot].used = self.clock()
                req.status, req.slot, req.cached, req.computed = RequestStatus.RUNNING, slot, reuse, reuse
                self.running[slot] = req
                admitted.append(Admission(req, slot, reuse))
        return admitted

    def _pick_slot(self, ids: list[int], *, reuse: bool = True) -> tuple[int, int]:
        """The free slot sharing the longest prefix with `ids` (at most len - 1 tokens, so the
        last prompt token is computed for its logits), and that prefix's length. A prefix under
        MIN_REUSE tokens (a shared BOS) is not worth a slot's cache: then an empty slot before one
        holding a cached conversation, and among those the one that keeps the running requests packed
        (a decode step computes every row from the lowest to the highest decoding slot; new requests
        in adjacent slots prefill in one batched forward), then the least recently used. Without `reuse`
        no prefix counts (the slot is emptied)."""
        busy = list(self.running)
        best, best_key = None, None
        for s, slot in enumerate(self.slots):
            if s in self.running:
                continue
            have = slot.tokens
            n = min(len(have), len(ids) - 1) if reuse else 0
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
        prompts' tails) go one by one, oldest first, a prompt whose logprobs are reported in chunks of at
        most prefill_chunk ids (their logits [ids, V] are kept)."""
        left = {r: len(r.prompt_ids) - r.computed for r in waiting}  # prompt ids not planned yet
        plan: list[Prefill] = []
        cap = budget or BATCH_PREFILL_TOKENS
        fresh = [r for r in waiting if not r.prompt_logprobs]
        for run in (self._fresh_runs(fresh) if self.batched_prefill else []):
            n = min(min(left[r] for r in run), cap)
            k = cap // n  # rows per forward
            for group in (run[i:i + k] for i in range(0, len(run), k)):
                if len(group) < 2:
                    break
                plan.append(self._chunk(group, n, left))
                if budget is not None:
                    return plan
        for req in sorted(waiting, key=lambda r: r.submitted):
            while left[req]:
                n = left[req] if budget is None else min(budget, left[req])
                plan.append(self._chunk([req], min(n, self.prefill_chunk) if req.prompt_logprobs else n, left))
                if budget is not None:
                    return plan
        return plan

    @staticmethod
    def _chunk(group: list[Request], n: int, left: dict[Request, int]) -> Prefill:
        """The next n prompt ids of each request in `group` as one forward."""
        ids, last, starts = [], [], []
        for r in group:
            start = len(r.prompt_ids) - left[r]
            ids.append(r.prompt_ids[start:start + n])
            last.append(left[r] == n)
            starts.append(start)
            left[r] -= n
        return Prefill(list(group), ids, last, starts)

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

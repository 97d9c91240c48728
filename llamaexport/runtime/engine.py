"""The serving engine: continuous batching over KV-cache slots, chunked prefill, prefix reuse.

    engine = Engine(model, max_batch=4)                   # model: a loaded LlamaModel
    for event in engine.stream(ids, max_new_tokens=64):   # TextEvent pieces, then one DoneEvent
        ...
    engine.submit(ids, max_new_tokens=64, on_event=f)     # from any thread; QueueFull past max_queue

The engine owns `max_batch` KV-cache slots, and each `step()` is vLLM v1's three calls:
  plan = scheduler.schedule()          runtime.scheduler: which requests are admitted into which slot
                                       (reusing a cached prefix), which prefill chunks run, which slots
                                       decode; pure bookkeeping, tested without a model
  out = executor.execute(plan)         `Executor`: those forwards over the slot cache (runtime.slots),
                                       the cache copies of n-choice requests, and one sampled token (and
                                       its logprobs, where asked) per request whose next token they give;
                                       the grammar masks of constrained requests (submit(grammar=...)) are
                                       filled on a MaskWorker thread while the forwards run
  scheduler.update_from_output(...)    the tokens appended, finished requests ended; the engine then
                                       delivers the events
A decoding stream waits at most one forward of `prefill_chunk` prompt tokens between two of its tokens.
ONNX Runtime's GroupQueryAttention takes a prompt chunk on top of a cache only for batch 1 (it
refuses batch > 1 with sequence length > 1 and a past), hence prefill chunks and decode steps are
separate forwards.

Slots follow the backend's `kv_form` (runtime.slots.make_slots): a graph whose cache is one max-length
buffer written in place (KVForm.INPLACE: the ONNX Runtime CPU graph's GroupQueryAttention, the TensorRT
>= 10.15 graph's TensorScatter, on either backend) gets `InplaceSlots`, rows of one buffer, each with its
own length; a Concat cache (the portable graph for TensorRT < 10.15) gets `ConcatSlots`: per-slot caches,
left-padded into one batch per decode step.

Threads: `start()` runs `step()` in a background thread (the server); without it, `stream()`
drives the steps itself (the chat REPL, tests). Events are delivered through each request's
`on_event` callback, called on the engine's thread. Only that thread touches the slots and the
running requests; other threads submit, cancel and shut down through the queue, flags and `cond`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import numpy as np

from llamaexport import LlamaExportError, whole_number
from llamaexport.runtime.completion import (
    BadArgument,
    Completion,
    ContextTooLong,
    FinishReason,
    check_generation,
    eos_set,
)
from llamaexport.runtime.sampling import SamplingConfig, token_logprobs
from llamaexport.runtime.scheduler import (
    DoneEvent,
    Events,
    Prefill,
    QueueFull,
    Request,
    Scheduler,
    StepOutput,
    StepPlan,
    TextEvent,
)
from llamaexport.runtime.slots import SlotCache, make_slots

__all__ = ["BadArgument", "ContextTooLong", "DoneEvent", "Engine", "Executor", "FinishReason", "QueueFull", "Request",
           "ShuttingDown", "TextEvent", "check_limits"]


class ShuttingDown(LlamaExportError):
    """The engine takes no new requests (shutdown() was called)."""


DEFAULT = object()  # submit(speculative=DEFAULT): the engine's

# An idle engine waits this long after a request for others to join its first (batched) prefill.
GATHER_S = 0.005


def check_limits(*, max_batch, max_queue, prefill_chunk):
    """The one validation of the engine's limits (the server calls it before loading the model)."""
    for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1)):
        whole_number(v, name, at_least=lo)


class Executor:
    """Runs a StepPlan over a SlotCache (vLLM's model executor): cuts each admitted slot's cache to the
    prefix its request reuses, runs the planned prefill forwards, copies a leader's prompt cache into its
    followers' slots, then runs the one batched decode forward, and samples a token for each request whose
    next token the logits give (a prompt's last chunk, a follower from its leader's, every decode row),
    each with its own Sampler. Logprobs come from the same raw logits, for the requests that ask only.
    A request with a grammar (Request.constraint) has its next-token mask filled by a MaskWorker thread from
    the start of the step, waited for once the first logits it needs are there, and applied by its Sampler
    after the bias and penalties; a step without constrained rows never touches the worker."""

    def __init__(self, slots: SlotCache, model=None):
        self.slots = slots
        self.model = model  # the target LlamaModel: a draft artifact is checked against it (speculation)
        self.masks = None  # runtime.constraint.MaskWorker, made for the first constrained request
        self.drafts = {}  # id(draft LlamaModel) -> its runtime.speculative.DraftProposer, shared by requests
        self.spec_stats = None  # runtime.speculative.SpecStats over every speculative step (made at the first)

    def execute(self, plan: StepPlan) -> StepOutput:
        for a in plan.admitted:
            self.slots.truncate(a.slot, a.reuse)
        out = StepOutput({})
        # the next-token masks of the constrained rows this step samples, filled on the mask worker's
        # thread while the forwards run (each grammar has consumed its row's last token already)
        masks = self._fill_masks([*(r for c in plan.prefills for r, last in zip(c.requests, c.last) if last),
                                  *(c.request for c in plan.copies), *plan.decode])
        last_logits = {}  # a leader with followers -> the logits [V] its first token came from
        for chunk in plan.prefills:
            rows = self._prefill(chunk, out)
            for req, last, row in zip(chunk.requests, chunk.last, rows):
                if last:
                    masks = _wait(masks)
                    _pick(req, row, out)
                    if req.followers:
                        last_logits[req] = row
        for c in plan.copies:
            self.slots.copy_prefix(c.src, c.dst, c.n)
            masks = _wait(masks)
            _pick(c.request, last_logits[c.leader], out)
        if len(plan.decode) == 1 and plan.decode[0].speculative is not None:
            self._speculate(plan.decode[0], masks, out)  # one stream decodes: several tokens per forward
        elif plan.decode:
            logits = self.slots.decode([r.slot for r in plan.decode], [r.next_token for r in plan.decode])
            masks = _wait(masks)
            for req, row in zip(plan.decode, logits):
                _pick(req, row, out)
        return out

    def _speculate(self, req: Request, masks, out: StepOutput):
        """A decode step of one request that drafts tokens (runtime.speculative) and verifies them in one
        forward over its slot: out gets the verified tokens (accepted drafts, then the model's own), their
        logprobs, and the accepted drafts, whose KV stays in the slot (the rejected ones are cut off). The
        grammar consumes each verified token to mask the next position, then is rolled back: the scheduler's
        Completion consumes them again, in order."""
        from llamaexport.runtime.speculative import SpecStats, fit_to_grammar, verified

        spec, c, slot = req.speculative, req.constraint, req.slot
        history = req.prompt_ids + req.generated  # the last is next_token, not in the cache yet; verified extends it
        start = self.slots.length[slot]
        room = min(req.completion.max_new_tokens - len(req.generated) - 1, self.model.config.max_seq_len - len(history))
        k = max(0, min(spec.k, room))
        drafts, qs = self._proposer(req).propose(history, k, req.sampler) if k else ([], None)
        masks = _wait(masks)  # filled while the drafts were made; the grammar is used from this thread from here on
        drafts, qs, tail = fit_to_grammar(c, drafts, qs)
        logits = self.slots.prefill(slot, [req.next_token, *drafts], all_logits=True)  # [len(drafts) + 1, V]
        tokens, lps, gen = [], [], list(req.generated)
        eos, limit = req.completion.eos_ids, req.completion.max_new_tokens
        accepted = consumed = 0
        try:
            for i, t, hit, more in verified(req.sampler, logits, drafts, qs, tail, c, seen=history,
                                            generated=gen, penalize=req.sampling.repetition_penalty != 1.0,
                                            openai=bool(req.sampling.presence_penalty or req.sampling.frequency_penalty),
                                            done=lambda t: t in eos or len(gen) >= limit):
                tokens.append(t)
                if req.logprobs is not None:
                    lps.append(token_logprobs(logits[i:i + 1], [t], req.logprobs)[0])
                accepted += hit
                if more and c is not None:  # the next position's mask needs it consumed (undone below)
                    if not c.consume(t):
                        break
                    consumed += 1
        finally:
            if consumed:
                c.rollback(consumed)
        self.slots.truncate(slot, start + 1 + accepted)  # next_token and the accepted drafts stay cached
        out.tokens[req] = tokens
        out.accepted[req] = drafts[:accepted]
        if req.logprobs is not None:
            out.logprobs[req] = lps
        self.spec_stats = self.spec_stats or SpecStats()
        self.spec_stats.add(len(drafts), accepted, len(tokens))

    def _proposer(self, req: Request):
        """The request's prompt-lookup state, or the engine's shared draft proposer for its draft artifact."""
        from llamaexport.runtime.speculative import NgramProposer, make_proposer

        spec = req.speculative
        if spec.method == "ngram":
            if not isinstance(req.proposer, NgramProposer):
                req.proposer = NgramProposer(spec)
            return req.proposer
        key = id(spec.draft)
        if key not in self.drafts:
            self.drafts[key] = make_proposer(spec, self.model)
        return self.drafts[key]

    def _fill_masks(self, reqs):
        """Start filling the masks of the constrained requests among `reqs`; a future, or None when none is."""
        rows = [r.constraint for r in reqs if r.constraint is not None]
        if not rows:
            return None  # unconstrained steps never touch the mask worker
        if self.masks is None:
            from llamaexport.runtime.constraint import MaskWorker
            self.masks = MaskWorker()
        return self.masks.submit(rows)

    def close(self):
        if self.masks is not None:
            self.masks.close()
        for d in self.drafts.values():
            d.close()


    def _prefill(self, chunk: Prefill, out: StepOutput) -> np.ndarray:
        """One prefill forward; the last position's logits of each row [rows, V]. A chunk that keeps every
        position's logits [n, V] adds its prompt ids' logprobs to `out` (position j's logits give id j + 1's;
        the prompt's first id has none)."""
        if len(chunk.requests) > 1:
            return self.slots.prefill_rows(chunk.slot, chunk.ids)     # [rows, V]
        if not chunk.keep_logits:
            return self.slots.prefill(chunk.slot, chunk.ids[0])[None]  # [1, V]
        req, start, ids = chunk.requests[0], chunk.starts[0], chunk.ids[0]
        logits = self.slots.prefill(chunk.slot, ids, all_logits=True)  # [n, V]
        targets = req.prompt_ids[start + 1:start + len(ids) + 1]        # the ids these positions predict
        lps = out.prompt_logprobs.setdefault(req, [None] if start == 0 else [])
        lps += token_logprobs(logits[:len(targets)], targets, req.logprobs or 0)
        return logits[-1:]


def _wait(future):
    """Wait for a mask future (None: nothing to wait for); returns None, so it is waited for once."""
    if future is not None:
        future.result()


def _pick(req: Request, logits: np.ndarray, out: StepOutput):
    """Sample a request's next token from its logits [V] (with its penalties over what it has seen), and
    its logprobs from the same raw logits when it reports them."""
    seen = None
    if req.sampling.repetition_penalty != 1.0:  # over the prompt too
        seen = [np.asarray(req.prompt_ids + req.generated, np.int64)]
    token = int(req.sampler(logits[None], seen, [req.generated], [req.constraint])[0])
    out.tokens[req] = token
    if req.logprobs is not None:
        out.logprobs[req] = token_logprobs(logits[None], [token], req.logprobs)[0]


class Engine:
    """Continuous batching over `max_batch` slots of one LlamaModel (see the module docstring)."""

    def __init__(self, model, *, max_batch: int = 4, max_queue: int = 16, prefill_chunk: int = 128,
                 speculative=None):
        """speculative: the requests' default runtime.speculative.Speculation (None: off); a request decoding
        alone drafts and verifies several tokens per forward (a draft artifact is loaded here, once)."""
        check_limits(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
        self._own_draft = None  # a draft this engine loaded (a directory), which close() closes
        if speculative is not None and speculative.method == "draft":
            from llamaexport.runtime.speculative import load_draft
            loaded = load_draft(speculative.draft, model)
            self._own_draft = loaded if loaded is not speculative.draft else None
            speculative.draft = loaded
        self.speculative = speculative
        self.model = model
        self.tokenizer = model.require_tokenizer()
        self.ctx = model.config.max_seq_len
        limit = model.backend.max_batch  # a TensorRT engine's profiles bound its batch
        max_batch = min(max_batch, limit) if limit else max_batch
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.executor = Executor(make_slots(model.backend, max_batch), model)
        self.scheduler = Scheduler(max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                   batched_prefill=self.executor.slots.batched_prefill)
        self.cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancel_all = False
        self.steps = 0  # batched decode forwards run (tests read it)
        self.error: str | None = None

    @property
    def slots(self) -> SlotCache:
        """The KV-cache slots (the executor's)."""
        return self.executor.slots

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop=(), eos_ids=None, on_event=None, n: int = 1, logprobs: int | None = None,
               prompt_logprobs: bool = False, grammar=None, skip_special: bool = True, speculative=DEFAULT) -> Request:
        """Queue a generation. Raises LlamaExportError for a request that cannot run (BadArgument naming the
        argument), QueueFull when --max-queue requests are already waiting.

        n: choices, each its own continuation of the prompt, whose cache is computed once (1 .. max_batch);
        with a seed, choice i samples with seed + i. Their events carry `index`; the request returned is
        the first choice's, which `cancel` ends with the others. logprobs: report each generated token's
        logprob and this many alternatives (0 .. 20; None: none); prompt_logprobs: the prompt's too.
        grammar: a compiled runtime.constraint.Grammar the reply must follow (each choice its own
        Constraint); skip_special=False keeps special tokens' text (tool-call markers, for the parser).
        speculative: a runtime.speculative.Speculation, None (off), or the engine's default."""
        check_generation(max_new_tokens=max_new_tokens, stop=stop, prompt_tokens=len(prompt_ids), context=self.ctx,
                         whole_reply=True, n=n, slots=self.max_batch, logprobs=logprobs)
        if prompt_logprobs and logprobs is None:
            raise BadArgument("the prompt's logprobs need logprobs (0 .. 20 alternatives)", "logprobs")
        sampling = sampling or SamplingConfig()
        try:
            sampling.check_vocab(self.model.config.vocab_size)
        except LlamaExportError as e:
            raise BadArgument(str(e), "logit_bias") from None
        speculative = self._check_speculative(speculative)
        ids = list(map(int, prompt_ids))
        group = []
        first = None
        if grammar is not None:
            from llamaexport.runtime.constraint import Constraint
            if grammar.n_vocab > self.model.config.vocab_size:
                raise BadArgument(f"the grammar was compiled for {grammar.n_vocab} tokens; this model has "
                                  f"{self.model.config.vocab_size}", "response_format")
            first = Constraint(grammar)
        for i in range(n):
            seeded = sampling if i == 0 or sampling.seed is None else dataclasses.replace(
                sampling, seed=(sampling.seed + i) % 2**63)
            completion = Completion(self.tokenizer, prompt_ids=ids, stop=tuple(stop),
                                    eos_ids=eos_set(self.tokenizer, eos_ids), max_new_tokens=max_new_tokens,
                                    constraint=None if first is None else first if i == 0 else first.fork(),
                                    skip_special=skip_special)
            group.append(Request(ids, seeded, completion, on_event, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                 index=i, speculative=speculative))
        req = group[0]
        req.followers = group[1:]
        for f in req.followers:
            f.leader = req
        with self.cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down; retry on another instance")
            if self._thread is not None and not self._thread_running():
                raise ShuttingDown(self.error or "the engine has stopped")
            self.scheduler.add(req)
            self.cond.notify_all()
        return req

    def _check_speculative(self, speculative):
        """submit's speculative: DEFAULT (the engine's), None, or a Speculation; a draft must be the engine's
        own (loaded once, at construction), so no request loads a model on the engine's thread."""
        from llamaexport.runtime.speculative import Speculation

        if speculative is DEFAULT:
            return self.speculative
        if speculative is not None and not isinstance(speculative, Speculation):
            raise BadArgument("speculative must be a runtime.speculative.Speculation or None", "speculative")
        if speculative is not None and speculative.method == "draft" and (
                self.speculative is None or speculative.draft is not self.speculative.draft):
            raise BadArgument("a request's draft must be the engine's own (Engine(speculative=Speculation('draft', "
                              "draft=DIR)), serve --draft DIR)", "speculative")
        return speculative

    def cancel(self, req: Request):
        """Stop a request, with its other choices (a client went away); their slots are freed at the next step."""
        for r in req.group:
            r.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def counts(self) -> tuple[int, int]:
        """(sequences in slots, requests waiting)."""
        return self.scheduler.counts()

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
            self._fail_all(f"the engine stopped: {_first_line(e)}", queued=True)
            raise

    def _run_steps(self):
        sched = self.scheduler
        while True:
            with self.cond:
                idle = not sched.running
                while not self._stopping and not sched.has_work:
                    self.cond.wait()
                if self._stopping and not sched.has_work:
                    return
                if idle:  # requests sent together arrive a few ms apart: let them start together
                    deadline = time.monotonic() + GATHER_S
                    while len(sched.queue) < self.max_batch and (left := deadline - time.monotonic()) > 0:
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
        while self.scheduler.has_work and time.monotonic() < deadline and self._thread_running():
            time.sleep(0.02)
        with self.cond:
            self._cancel_all = True  # the engine's own thread cancels at its next step (it owns the requests)
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=grace + 5)
        else:
            while self.scheduler.has_work:
                self._guarded_step()

    def _thread_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self):
        self.shutdown(grace=0)
        self.executor.close()
        self.slots.close()
        if self._own_draft is not None:
            self._own_draft.close()

    def stream(self, prompt_ids: list[int], **kw) -> Iterator[TextEvent | DoneEvent]:
        """submit() and yield the request's events in order, ending with its DoneEvent (n choices: their
        events interleaved, by `index`, until each has had its DoneEvent). Drives the steps itself when no
        thread runs them. Closing the iterator early cancels the request."""
        import queue as q

        box: q.Queue = q.Queue()
        req = self.submit(prompt_ids, on_event=box.put, **kw)
        left = len(req.group)
        try:
            while True:
                if self._thread is None:
                    while box.empty():
                        self._guarded_step()
                ev = box.get()
                yield ev
                left -= isinstance(ev, DoneEvent)
                if not left:
                    return
        finally:
            if not req.all_done:
                self.cancel(req)
                if self._thread is None:
                    self._guarded_step()  # frees the slot now

    # ------------------------------------------------------------------ one step
    def step(self):
        """schedule(), execute(), update_from_output(), then the events (see the module docstring)."""
        with self.cond:
            if self._cancel_all:
                self.scheduler.cancel_all()
            plan = self.scheduler.schedule()
        self._deliver(plan.finished)
        out = self.executor.execute(plan)
        self.steps += bool(plan.decode)
        self._deliver(self.scheduler.update_from_output(plan, out.tokens, out.logprobs, out.prompt_logprobs,
                                                        out.accepted))

    def _deliver(self, events: Events):
        """Each event to its request's on_event; a cancelled request gets its DoneEvent only."""
        for req, ev in events:
            if req.on_event is not None and (isinstance(ev, DoneEvent) or not req.cancelled):
                req.on_event(ev)

    def _fail_all(self, message: str, *, queued: bool = False):
        """End every running request (and with `queued`, every waiting one) with an error event."""
        self.error = message
        with self.cond:
            events, slots = self.scheduler.fail(message, queued=queued)
        for s in slots:
            self.slots.truncate(s, 0)  # its cache may be half-written
        self._deliver(events)


def _first_line(e: BaseException) -> str:
    return ((str(e).splitlines() or [""])[0] or type(e).__name__)[:300]

"""The serving engine's scheduler without a model: the plans schedule() makes (admission, the slot and
prefix a request gets, prefill chunks while others decode and when nobody does, batched prefill of
adjacent empty slots, the decode rows, n choices that prefill once and copy, a prompt whose logprobs are
reported) and what update_from_output() does with made-up tokens (EOS, stop strings, max tokens,
logprobs, cancellation, failure)."""

import itertools

import pytest

from llamaexport.runtime.completion import Completion, FinishReason
from llamaexport.runtime.sampling import SamplingConfig, TokenLogprob
from llamaexport.runtime.scheduler import (
    BATCH_PREFILL_TOKENS,
    MIN_REUSE,
    DoneEvent,
    QueueFull,
    Request,
    RequestStatus,
    Scheduler,
    TextEvent,
)


class Letters:
    """A made-up tokenizer: id i is the letter chr(97 + i % 26)."""

    def decode(self, ids, skip_special=True):
        return "".join(chr(97 + i % 26) for i in ids)


def request(prompt, *, max_new=4, stop=(), eos=(), at=0.0, **kw) -> Request:
    c = Completion(Letters(), prompt_ids=prompt, stop=stop, eos_ids=frozenset(eos), max_new_tokens=max_new)
    return Request(list(prompt), SamplingConfig(), c, submitted=at, **kw)


def group(prompt, n, **kw) -> Request:
    """A request for n choices, as Engine.submit makes it: a leader and n - 1 followers."""
    lead, *rest = (request(prompt, index=i, **kw) for i in range(n))
    lead.followers = rest
    for f in rest:
        f.leader = lead
    return lead


def scheduler(n=3, *, max_queue=4, chunk=8, batched=True) -> Scheduler:
    ticks = itertools.count(1)
    return Scheduler(n, max_queue=max_queue, prefill_chunk=chunk, batched_prefill=batched, clock=lambda: float(next(ticks)))


def prompt(n, start=100):
    return list(range(start, start + n))


def step(s: Scheduler, tokens=lambda r: 1):
    """One step with made-up sampling: schedule, then a token for each request whose logits the plan's
    forwards give (a prompt's last chunk, a copy's follower, a decode row). Returns (plan, events)."""
    plan = s.schedule()
    sampled = {}
    for chunk in plan.prefills:
        for r, last in zip(chunk.requests, chunk.last):
            if last:
                sampled[r] = tokens(r)
    for c in plan.copies:  # a follower samples from its leader's logits
        sampled[c.request] = tokens(c.request)
    for r in plan.decode:
        sampled[r] = tokens(r)
    return plan, plan.finished + s.update_from_output(plan, sampled)


def shape(plan):
    """The prefill forwards as (first slot, [ids per row], [ends the prompt per row])."""
    return [(c.slot, [len(i) for i in c.ids], c.last) for c in plan.prefills]


def test_admission_in_order_and_queue_limits():
    s = scheduler(2, max_queue=1)
    reqs = [request(prompt(5, 10 * i), at=i) for i in range(3)]
    for r in reqs:
        s.add(r)
    with pytest.raises(QueueFull, match=r"0 requests are running and 3 waiting \(--max-batch 2, --max-queue 1\)"):
        s.add(request(prompt(5)))
    plan = s.schedule()
    assert [(a.request, a.slot, a.reuse) for a in plan.admitted] == [(reqs[0], 0, 0), (reqs[1], 1, 0)]
    assert [r.status for r in reqs] == [RequestStatus.RUNNING, RequestStatus.RUNNING, RequestStatus.WAITING]
    assert s.counts() == (2, 1)
    with pytest.raises(QueueFull):  # two running and one waiting fill two slots and a queue of one
        s.add(request(prompt(5)))


def test_idle_prefill_runs_every_prompt_and_batches_adjacent_empty_slots():
    """Nobody decodes: every prompt in full. New requests in adjacent empty slots share forwards over
    their common length (at most BATCH_PREFILL_TOKENS tokens per forward); the longer prompt's tail,
    and a trailing group of one, run alone."""
    s = scheduler(3)
    a, b, c = (request(prompt(n, 100 * i), at=i) for i, n in enumerate((20, 20, 30)))
    for r in (a, b, c):
        s.add(r)
    plan, events = step(s)
    assert shape(plan) == [(0, [20, 20, 20], [True, True, False]), (2, [10], [True])]
    assert plan.prefills[0].ids[2] == c.prompt_ids[:20] and plan.prefills[1].ids[0] == c.prompt_ids[20:]
    assert plan.decode == [] and [r.next_token for r in (a, b, c)] == [1, 1, 1]
    assert [e.text for _, e in events] == ["b", "b", "b"] and s.slots[2].tokens == c.prompt_ids

    n = BATCH_PREFILL_TOKENS // 2 - 10  # two rows fit one forward, three do not
    s = scheduler(3)
    for i in range(3):
        s.add(request(prompt(n, 1000 * i), max_new=2, at=i))
    assert shape(s.schedule()) == [(0, [n, n], [True, True]), (2, [n], [True])]


def test_prefill_under_decode_is_one_bounded_forward():
    """While others decode, a step runs ONE prefill forward of at most prefill_chunk tokens besides the
    decode: two new requests in adjacent empty slots together if both fit, else the oldest's chunk."""
    s = scheduler(4, chunk=8)
    first = request(prompt(3), max_new=20)
    s.add(first)
    step(s)
    late = request(prompt(20, 500), at=1.0)
    s.add(late)
    chunks = []
    while late.next_token is None:
        plan, _ = step(s)
        assert plan.decode == [first]
        chunks += shape(plan)
    assert chunks == [(1, [8], [False]), (1, [8], [False]), (1, [4], [True])]
    plan = s.schedule()
    assert plan.decode == [first, late] and plan.prefills == []  # ascending slots

    s.update_from_output(plan, {first: 1, late: 1})
    x, y = request(prompt(4, 600), at=2.0), request(prompt(4, 700), at=3.0)
    s.add(x)
    s.add(y)
    assert shape(s.schedule()) == [(2, [4, 4], [True, True])]
    s = scheduler(4, chunk=8, batched=False)  # a slot cache without batched prefill: one by one, oldest first
    s.add(request(prompt(3), max_new=20))
    step(s)
    s.add(request(prompt(4, 600), at=3.0))
    s.add(request(prompt(4, 700), at=2.0))
    assert shape(s.schedule()) == [(2, [4], [True])]


def test_longest_prefix_slot_min_reuse_and_least_recently_used():
    s = scheduler(3)
    conv_a, conv_b = prompt(20, 100), prompt(20, 200)
    s.slots[0].tokens, s.slots[1].tokens = list(conv_a), list(conv_b)
    follow = request(conv_b[:12] + [7, 8])
    s.add(follow)
    plan = s.schedule()
    assert [(a.slot, a.reuse) for a in plan.admitted] == [(1, 12)] and (follow.cached, follow.computed) == (12, 12)
    assert s.slots[1].tokens == conv_b[:12] and plan.prefills[0].ids == [[7, 8]]  # only the new ids are computed

    s = scheduler(3)
    s.slots[0].tokens, s.slots[1].tokens = list(conv_a), list(conv_b)
    short = request(conv_a[:MIN_REUSE - 1] + [1, 2, 3])  # too short a prefix: an empty slot instead
    s.add(short)
    s.add(same := request(conv_a))
    plan = s.schedule()
    assert [(a.slot, a.reuse) for a in plan.admitted] == [(2, 0), (0, 19)]  # the last prompt id is computed again
    assert s.slots[0].tokens == conv_a[:19] and same.cached == 19

    s = scheduler(2)
    s.slots[0].tokens, s.slots[1].tokens = prompt(20, 300), prompt(20, 400)
    s.slots[0].used, s.slots[1].used = 5.0, 2.0
    s.add(r := request(prompt(10, 900)))
    assert s.schedule().admitted[0].slot == 1 and r.cached == 0 and s.slots[1].tokens == []


def test_tokens_and_finishes_eos_stop_length():
    """update_from_output feeds each sampled token to the request's Completion: an EOS id ends it with no
    text, a stop string cuts the text, the max_new_tokens-th token ends it; the slot keeps what its cache
    holds (the prompt and every token fed back: the last sampled one never went in)."""
    s = scheduler(3)
    eos = request(prompt(4, 0), eos=(9,), at=0.0)
    stop = request(prompt(4, 10), stop=("cd",), max_new=10, at=1.0)
    length = request(prompt(4, 20), max_new=2, at=2.0)
    for r in (eos, stop, length):
        s.add(r)
    script = {eos: iter([0, 9]), stop: iter([1, 2, 3]), length: iter([4, 5])}
    events = []
    while s.has_work:
        events += step(s, lambda r: next(script[r]))[1]
    done = {r: e for r, e in events if isinstance(e, DoneEvent)}
    text = {r: [e.text for q, e in events if q is r and isinstance(e, TextEvent)] for r in script}
    assert (done[eos].finish_reason, done[eos].text, done[eos].completion_tokens) == (FinishReason.EOS, "a", 2)
    assert text[eos] == ["a"]
    assert (done[stop].finish_reason, done[stop].text, text[stop]) == (FinishReason.STOP, "b", ["", "b", ""])
    assert (done[length].finish_reason, done[length].text, text[length]) == (FinishReason.LENGTH, "ef", ["e", "f"])
    assert [r.status for r in script] == [RequestStatus.FINISHED] * 3 and s.counts() == (0, 0)
    assert s.slots[0].tokens == eos.prompt_ids + [0] and s.slots[1].tokens == stop.prompt_ids + [1, 2]
    assert FinishReason.EOS.openai == FinishReason.STOP.openai == "stop" and FinishReason.LENGTH.openai == "length"


def test_cancellation_frees_the_slot_for_the_next_request():
    s = scheduler(1, max_queue=2)
    running, waiting, gone = request(prompt(10), max_new=50), request(prompt(6, 200), at=1.0), request(prompt(3), at=2.0)
    for r in (running, waiting, gone):
        s.add(r)
    step(s)
    gone.cancelled = running.cancelled = True
    plan = s.schedule()
    assert [(r, e.finish_reason, e.completion_tokens) for r, e in plan.finished if isinstance(e, DoneEvent)] == [
        (gone, FinishReason.CANCELLED, 0), (running, FinishReason.CANCELLED, 1)]
    assert [a.request for a in plan.admitted] == [waiting] and waiting.slot == 0 and s.counts() == (1, 0)
    assert running.done and gone.done and plan.decode == [] and shape(plan) == [(0, [6], [True])]


def test_fail_ends_running_and_waiting_and_empties_their_slots():
    s = scheduler(2, max_queue=2)
    a, b, c = (request(prompt(5, 100 * i), at=i) for i in range(3))
    for r in (a, b, c):
        s.add(r)
    step(s)
    events, slots = s.fail("boom", queued=True)
    assert slots == [0, 1] and s.slots[0].tokens == s.slots[1].tokens == []
    errors = [(r, e.finish_reason, e.error) for r, e in events if isinstance(e, DoneEvent)]
    assert errors == [(r, FinishReason.ERROR, "boom") for r in (a, b, c)]
    assert s.counts() == (0, 0) and all(r.done for r in (a, b, c))


def test_n_choices_are_admitted_together_prefilled_once_and_copied():
    """A request for 3 choices takes 3 slots at once (or waits, and so does the queue behind it); only the
    leader's prompt is prefilled, and the step of its last chunk copies its cache into the followers' slots,
    each of which samples its own first token there; then all three decode."""
    s = scheduler(4, max_queue=4, chunk=8)
    busy = request(prompt(3), max_new=20)
    s.add(busy)
    step(s)
    lead = group(prompt(12, 200), 3, max_new=5, at=1.0)
    single = request(prompt(4, 300), at=2.0)
    s.add(lead)
    s.add(single)
    assert s.counts() == (1, 4)  # every choice counts
    with pytest.raises(QueueFull):
        s.add(group(prompt(5), 4))  # 1 running + 4 waiting + 4 > 4 slots + 4 queued
    plan, _ = step(s)
    assert [a.request for a in plan.admitted] == lead.group and [a.reuse for a in plan.admitted] == [0, 0, 0]
    assert [r.slot for r in lead.group] == [1, 2, 3] and plan.decode == [busy]
    assert shape(plan) == [(1, [8], [False])] and plan.copies == []  # the leader's first chunk, nothing to copy
    assert single.status is RequestStatus.WAITING  # no slot left for it
    plan, events = step(s, tokens=lambda r: 10 + r.index)
    assert shape(plan) == [(1, [4], [True])]
    assert [(c.src, c.dst, c.n, c.request, c.leader) for c in plan.copies] == [(1, 2, 12, lead.followers[0], lead),
                                                                               (1, 3, 12, lead.followers[1], lead)]
    assert all(s.slots[r.slot].tokens == lead.prompt_ids and r.computed == 12 for r in lead.group)
    assert [(e.index, e.text) for r, e in events if r in lead.group] == [(0, "k"), (1, "l"), (2, "m")]
    plan, _ = step(s)
    assert plan.decode == [busy, *lead.group] and plan.prefills == [] and plan.copies == []
    events = []
    while not lead.all_done:
        events += step(s)[1]
    assert [(e.index, e.completion_tokens) for r, e in events if isinstance(e, DoneEvent)] == [(0, 5), (1, 5), (2, 5)]
    assert [a.request for a in step(s)[0].admitted] == [single]  # the slots the group left


def test_a_group_that_cannot_start_keeps_its_place_and_goes_whole():
    s = scheduler(2, max_queue=4)
    first = request(prompt(3), max_new=3)
    s.add(first)
    step(s)
    lead, after = group(prompt(6, 100), 2, at=1.0), request(prompt(6, 200), at=2.0)
    s.add(lead)
    s.add(after)
    assert s.schedule().admitted == []  # one slot free, the group needs two: nobody overtakes it
    lead.cancelled = True  # a queued leader takes its group along
    plan = s.schedule()
    assert [(r, e.finish_reason, e.index) for r, e in plan.finished] == [(lead, FinishReason.CANCELLED, 0),
                                                                          (lead.followers[0], FinishReason.CANCELLED, 1)]
    assert [a.request for a in plan.admitted] == [after]

    s = scheduler(3)
    lead = group(prompt(20), 3)
    s.add(lead)
    s.schedule()  # admitted; its prefill (idle: the whole prompt) never ran
    lead.cancelled = True  # before its followers got the cache: they go too (else they would wait forever)
    plan = s.schedule()
    assert {r for r, e in plan.finished if isinstance(e, DoneEvent)} == set(lead.group) and s.counts() == (0, 0)


def test_a_prompt_whose_logprobs_are_reported_is_prefilled_alone_in_kept_chunks():
    """No cached prefix is reused (every position's logits are needed), it is not batched with other new
    prompts, and even with nobody decoding it runs in chunks of at most prefill_chunk ids, each planned
    with where it starts."""
    s = scheduler(3, chunk=8)
    conv = prompt(20)
    s.slots[0].tokens = list(conv)
    echo = request(conv + [1, 2], logprobs=0, prompt_logprobs=True)
    other = request(prompt(22, 500), at=1.0)
    s.add(echo)
    s.add(other)
    plan = s.schedule()
    assert [(a.request, a.reuse) for a in plan.admitted] == [(echo, 0), (other, 0)] and echo.slot == 1
    chunks = [(c.requests, [len(i) for i in c.ids], c.starts, c.keep_logits) for c in plan.prefills]
    assert chunks == [([echo], [8], [0], True), ([echo], [8], [8], True), ([echo], [6], [16], True),
                      ([other], [22], [0], False)]


def test_logprobs_go_with_the_text_and_stop_with_it():
    """A token's logprob is delivered with the event that first shows its text: held back with it (a stop
    string could still begin), dropped with it when a stop string cuts it away; an EOS id's is never
    reported. The DoneEvent has all that were delivered."""
    s = scheduler(2)
    stop = request(prompt(4, 10), stop=("cd",), max_new=10, logprobs=0)
    eos = request(prompt(4, 20), eos=(9,), logprobs=0, at=1.0)
    s.add(stop)
    s.add(eos)
    script = {stop: iter([1, 2, 3]), eos: iter([0, 9])}
    events = []
    while s.has_work:
        plan = s.schedule()
        sampled = {r: next(script[r]) for c in plan.prefills for r, last in zip(c.requests, c.last) if last}
        sampled.update({r: next(script[r]) for r in plan.decode})
        lps = {r: TokenLogprob(t, -float(t), []) for r, t in sampled.items()}
        events += s.update_from_output(plan, sampled, lps)
    text = [(e.text, [lp.token_id for lp in e.logprobs]) for r, e in events if r is stop and isinstance(e, TextEvent)]
    assert text == [("", []), ("b", [1]), ("", [])]  # "c" (2) and "d" (3) were cut by the stop string "cd"
    done = {r: e for r, e in events if isinstance(e, DoneEvent)}
    assert [lp.token_id for lp in done[stop].logprobs] == [1] and done[stop].text == "b"
    assert [(lp.token_id, lp.offset) for lp in done[eos].logprobs] == [(0, 0)]  # not the EOS id 9

"""The serving engine (continuous batching, chunked prefill, prefix reuse), `llamaexport serve`
against real clients (the openai package, httpx), and the `llamaexport chat` REPL."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from llamaexport import LlamaExportError
from llamaexport.runtime.engine import ContextTooLong, DoneEvent, Engine, QueueFull, TextEvent
from llamaexport.runtime.llama_model import LlamaModel
from llamaexport.runtime.sampling import SamplingConfig
from llamaexport.runtime.slots import make_slots
from llamaexport.verify.bench import free_port

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install 'llamaexport[serve]')")
openai = pytest.importorskip("openai", reason="the serve tests need the openai package")
pytest.importorskip("uvicorn", reason="serving needs the serve extra")


def _ids(events):
    return [e.token_id for e in events if isinstance(e, TextEvent) and e.token_id >= 0]


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, min(vocab, 400), n).tolist() for n in lengths]


def _run_all(engine, prompts, **kw):
    """Submit every prompt at once and step until all are done: {index: (token ids, DoneEvent)}."""
    got = {i: [] for i in range(len(prompts))}
    done = {}
    for i, p in enumerate(prompts):
        def on_event(ev, i=i):
            if isinstance(ev, DoneEvent):
                done[i] = ev
            elif ev.token_id >= 0:
                got[i].append(ev.token_id)
        engine.submit(p, on_event=on_event, **kw)
    while len(done) < len(prompts):
        engine.step()
    return {i: (got[i], done[i]) for i in got}


@pytest.mark.parametrize("graph", ["gqa", "portable"])
def test_batched_equals_alone(graph, tiny_artifact, tiny_portable):
    """Five requests through three slots, prompts longer than the prefill chunk: each request's
    greedy tokens equal the same prompt generated alone, and decoding really was batched."""
    art, backend = (tiny_artifact, None) if graph == "gqa" else (tiny_portable, "onnxruntime")
    with LlamaModel.load(art, backend=backend) as m:
        prompts = _prompts(m.config.vocab_size, (5, 17, 40, 9, 23))
        alone = [m.generate_ids([p], max_new_tokens=24, eos_ids=[])[0] for p in prompts]
        engine = Engine(m, max_batch=3, prefill_chunk=8)
        out = _run_all(engine, prompts, max_new_tokens=24, eos_ids=[])
        for i in range(len(prompts)):
            assert out[i][0] == alone[i], f"request {i} differs when batched"
            assert out[i][1].finish_reason == "length" and out[i][1].completion_tokens == 24
        # 5 x 23 single-token decodes ran in far fewer batched forwards
        assert engine.steps < 0.6 * 5 * 23, engine.steps
        engine.close()


def test_prefix_reuse_never_changes_output(tiny_artifact):
    """A follow-up that resends prompt + answer + more reuses the cached prefix (only the new
    tokens are prefilled) and still generates exactly what a fresh run does."""
    with LlamaModel.load(tiny_artifact) as m:
        engine = Engine(m, max_batch=2, prefill_chunk=16)
        p1 = _prompts(m.config.vocab_size, (30,))[0]
        first = list(engine.stream(p1, max_new_tokens=12, eos_ids=[]))
        a1 = _ids(first)
        assert first[-1].cached_tokens == 0
        p2 = p1 + a1 + [5, 6, 7]
        second = list(engine.stream(p2, max_new_tokens=12, eos_ids=[]))
        assert second[-1].cached_tokens == len(p1) + len(a1) - 1  # the last answer token never went in
        assert _ids(second) == m.generate_ids([p2], max_new_tokens=12, eos_ids=[])[0]
        # an unrelated prompt in the other slot keeps the first conversation's cache
        other = _prompts(m.config.vocab_size, (20,), seed=3)[0]
        assert _ids(engine.stream(other, max_new_tokens=5, eos_ids=[])) == m.generate_ids([other], max_new_tokens=5,
                                                                                            eos_ids=[])[0]
        third = list(engine.stream(p2 + [9], max_new_tokens=4, eos_ids=[]))
        assert third[-1].cached_tokens >= len(p2)
        assert _ids(third) == m.generate_ids([p2 + [9]], max_new_tokens=4, eos_ids=[])[0]
        engine.close()


def test_penalties_follow_openai(tiny_artifact):
    """presence/frequency penalties (OpenAI's: subtracted from the logits of tokens already generated)
    make a greedy stream repeat itself less."""
    with LlamaModel.load(tiny_artifact) as m:
        engine = Engine(m, max_batch=1)
        p = _prompts(m.config.vocab_size, (6,))[0]
        plain = _ids(engine.stream(p, max_new_tokens=40, eos_ids=[]))
        pen = _ids(engine.stream(p, max_new_tokens=40, eos_ids=[],
                                 sampling=SamplingConfig(frequency_penalty=2.0, presence_penalty=2.0)))
        # the run path applies them the same way
        assert m.generate_ids([p], max_new_tokens=40, eos_ids=[],
                              sampling=SamplingConfig(frequency_penalty=2.0, presence_penalty=2.0))[0] == pen
        assert len(set(pen)) > len(set(plain)), (plain, pen)
        assert pen[0] == plain[0]  # nothing generated yet: nothing penalized
        engine.close()


def test_idle_conversation_between_decoding_rows_is_reused_intact(tiny_artifact):
    """Slot 1 holds a finished conversation while slots 0 and 2 decode around it (every decode step
    writes a dummy token into row 1, past its cached prefix): its follow-up still reuses the cache and
    generates what a fresh run does."""
    with LlamaModel.load(tiny_artifact) as m:
        engine = Engine(m, max_batch=3)
        conv, a, b = _prompts(m.config.vocab_size, (25, 12, 14), seed=9)
        first = _ids(engine.stream(conv, max_new_tokens=6, eos_ids=[]))  # in slot 0: move it to slot 1
        for buf in engine.slots.kv:
            buf[1] = buf[0]
        held = engine.scheduler.slots  # what each slot's cache holds, as the scheduler sees it
        held[1].tokens, held[0].tokens = held[0].tokens, []
        engine.slots.length[1], engine.slots.length[0] = engine.slots.length[0], 0
        out = _run_all(engine, [a, b], max_new_tokens=30, eos_ids=[])
        assert {s for s in range(3) if held[s].tokens} == {0, 1, 2}  # a and b went around slot 1
        assert out[0][0] == m.generate_ids([a], max_new_tokens=30, eos_ids=[])[0]
        follow = conv + first + [7, 8, 9]
        again = list(engine.stream(follow, max_new_tokens=8, eos_ids=[]))
        assert again[-1].cached_tokens == len(conv) + len(first) - 1
        assert _ids(again) == m.generate_ids([follow], max_new_tokens=8, eos_ids=[])[0]
        engine.close()


def test_backend_failure_ends_the_requests_not_the_engine(tiny_artifact):
    with LlamaModel.load(tiny_artifact) as m:
        engine = Engine(m, max_batch=2)
        p = _prompts(m.config.vocab_size, (8,))[0]
        real = engine.slots.decode

        def broken(*a, **k):
            raise RuntimeError("")  # an exception with no message
        engine.slots.decode = broken
        events = list(engine.stream(p, max_new_tokens=5, eos_ids=[]))
        assert events[-1].finish_reason == "error" and "RuntimeError" in events[-1].error
        engine.slots.decode = real
        assert _ids(engine.stream(p, max_new_tokens=5, eos_ids=[])) == m.generate_ids([p], max_new_tokens=5, eos_ids=[])[0]
        m.backend.max_batch = 1  # a backend that bounds its batch (a TensorRT engine's profiles) caps the slots
        assert Engine(m, max_batch=4).max_batch == 1
        engine.close()


def test_engine_limits_and_cancel(tiny_artifact):
    with LlamaModel.load(tiny_artifact) as m:
        engine = Engine(m, max_batch=1, max_queue=1)
        p = _prompts(m.config.vocab_size, (10,))[0]
        a = engine.submit(p, max_new_tokens=50, eos_ids=[])
        engine.submit(p, max_new_tokens=5, eos_ids=[])
        with pytest.raises(QueueFull, match="max-queue 1"):
            engine.submit(p, max_new_tokens=5)
        with pytest.raises(ContextTooLong, match=r"plus max_tokens \(256\) is more than the model's context"):
            engine.submit(p, max_new_tokens=m.config.max_seq_len)
        engine.step()
        engine.cancel(a)
        engine.step()
        assert a.done and engine.counts() == (1, 0)  # the waiting one took the freed slot
        engine.close()


def _by_choice(events) -> dict[int, list[int]]:
    """An n-choice stream's token ids per choice index (each choice ends with its DoneEvent)."""
    out, done = {}, set()
    for e in events:
        out.setdefault(e.index, [])
        if isinstance(e, DoneEvent):
            done.add(e.index)
        elif e.token_id >= 0:
            out[e.index].append(e.token_id)
    assert done == set(out)
    return out


@pytest.mark.parametrize("graph", ["gqa", "portable"])
def test_n_choices_prefill_the_prompt_once_and_equal_separate_requests(graph, tiny_artifact, tiny_portable):
    """n = 3 through the engine (InplaceSlots on the CPU graph, ConcatSlots on the portable one): the prompt is
    prefilled once and its cache copied into the two other slots; greedy gives 3 identical choices, each the
    prompt's greedy tokens alone; seeded sampling gives choice i what one request with seed + i gives."""
    art, backend = (tiny_artifact, None) if graph == "gqa" else (tiny_portable, "onnxruntime")
    with LlamaModel.load(art, backend=backend) as m:
        engine = Engine(m, max_batch=4, prefill_chunk=8)
        slots, seen = engine.slots, {"prefilled": 0, "copies": []}
        prefill, prefill_rows, copy_prefix = slots.prefill, slots.prefill_rows, slots.copy_prefix

        def counted_prefill(slot, ids, **kw):
            seen["prefilled"] += len(ids)
            return prefill(slot, ids, **kw)

        def counted_rows(lo, ids):
            seen["prefilled"] += sum(map(len, ids))
            return prefill_rows(lo, ids)

        def counted_copy(src, dst, n):
            seen["copies"].append((src, dst, n))
            return copy_prefix(src, dst, n)
        slots.prefill, slots.prefill_rows, slots.copy_prefix = counted_prefill, counted_rows, counted_copy
        p = _prompts(m.config.vocab_size, (21,))[0]
        alone = m.generate_ids([p], max_new_tokens=12, eos_ids=[])[0]
        events = list(engine.stream(p, max_new_tokens=12, eos_ids=[], n=3))
        assert _by_choice(events) == {0: alone, 1: alone, 2: alone}
        assert seen == {"prefilled": len(p), "copies": [(0, 1, len(p)), (0, 2, len(p))]}
        done = [e for e in events if isinstance(e, DoneEvent)]
        assert sorted(e.index for e in done) == [0, 1, 2] and {e.completion_tokens for e in done} == {12}

        sampled = lambda seed, n=1: engine.stream(p, max_new_tokens=12, eos_ids=[], n=n,  # noqa: E731
                                                  sampling=SamplingConfig(temperature=1.0, seed=seed))
        want = [_ids(sampled(11 + i)) for i in range(3)]
        assert _by_choice(sampled(11, n=3)) == dict(enumerate(want)) and len({tuple(w) for w in want}) == 3
        with pytest.raises(LlamaExportError, match=r"n=5 choices need 5 KV-cache slots .* --max-batch 4") as e:
            engine.submit(p, max_new_tokens=2, n=5)
        assert e.value.param == "n"
        engine.close()


def test_logprob_and_bias_rows_leave_the_others_alone(tiny_artifact):
    """Rows that report logprobs (with alternatives) or carry a logit bias run in the same batch as plain ones:
    every plain row's tokens equal the same request alone, and asking for logprobs changes no token."""
    with LlamaModel.load(tiny_artifact) as m:
        prompts = _prompts(m.config.vocab_size, (7, 13, 9, 11), seed=4)
        alone = [m.generate_ids([p], max_new_tokens=16, eos_ids=[])[0] for p in prompts]
        engine = Engine(m, max_batch=4)
        done, got = {}, {i: [] for i in range(4)}
        extra = [{}, {"logprobs": 20}, {"sampling": SamplingConfig(logit_bias={alone[2][0]: -100})}, {"logprobs": 0}]
        for i, (p, kw) in enumerate(zip(prompts, extra)):
            engine.submit(p, max_new_tokens=16, eos_ids=[], **kw,
                          on_event=lambda ev, i=i: done.__setitem__(i, ev) if isinstance(ev, DoneEvent)
                          else got[i].append(ev.token_id) if ev.token_id >= 0 else None)
        while len(done) < 4:
            engine.step()
        assert [got[i] for i in (0, 1, 3)] == [alone[i] for i in (0, 1, 3)]
        assert got[2][0] != alone[2][0]  # the banned token
        assert done[0].logprobs is None and len(done[1].logprobs) == 16 and len(done[1].logprobs[0].top) == 20
        assert [lp.token_id for lp in done[3].logprobs] == got[3] and done[3].logprobs[0].top == []
        engine.close()


def test_constrained_rows_leave_the_others_alone(tiny_artifact):
    """Rows under a grammar (their masks filled during the forward) decode in the same batch as plain
    ones: every plain row's tokens equal the same request alone; each constrained row's text matches its
    grammar and ends with "stop" as soon as the grammar is complete (no EOS forward), or with "length"
    when max_new_tokens comes first; n > 1 forks the grammar per choice."""
    import re

    from llamaexport.runtime.completion import FinishReason
    from llamaexport.runtime.constraint import compile_constraint

    with LlamaModel.load(tiny_artifact) as m:
        tok, V = m.tokenizer, m.config.vocab_size
        regex = compile_constraint({"type": "regex", "regex": "(yes|no) [0-9]{2}"}, tok, n_vocab=V)
        obj = compile_constraint({"type": "json_object"}, tok, n_vocab=V)
        prompts = _prompts(V, (7, 13, 9, 11), seed=5)
        alone = [m.generate_ids([p], max_new_tokens=12, eos_ids=[])[0] for p in prompts]
        engine = Engine(m, max_batch=5)
        done, got = {}, {i: {} for i in range(4)}
        extra = [{}, {"grammar": regex, "sampling": SamplingConfig(temperature=1.0, seed=3)}, {},
                 {"grammar": regex, "n": 2, "sampling": SamplingConfig(temperature=1.0, seed=1)}]
        for i, (p, kw) in enumerate(zip(prompts, extra)):
            engine.submit(p, max_new_tokens=12, eos_ids=[], **kw,
                          on_event=lambda ev, i=i: done.__setitem__((i, ev.index), ev) if isinstance(ev, DoneEvent)
                          else got[i].setdefault(ev.index, []).append(ev.token_id) if ev.token_id >= 0 else None)
        while len(done) < 5:
            engine.step()
        assert [got[0][0], got[2][0]] == [alone[0], alone[2]]
        for key in ((1, 0), (3, 0), (3, 1)):
            assert re.fullmatch("(yes|no) [0-9]{2}", done[key].text), done[key].text
            assert done[key].finish_reason is FinishReason.STOP
        # a grammar that cannot complete in 3 tokens: "length", the JSON left unfinished
        ev = list(engine.stream(prompts[0], max_new_tokens=3, grammar=obj))[-1]
        assert ev.finish_reason is FinishReason.LENGTH and ev.text.startswith("{")
        engine.close()
        # the same path in LlamaModel.stream / generate; the mask comes after the logit bias (a +100 bias on an
        # id the grammar refuses does not bring it back) and the logprobs stay raw (the forced ids' own)
        banned = tok.encode("zzz", add_bos=False)[0]
        g = m.generate("hi", max_new_tokens=12, constraint={"type": "regex", "regex": "(yes|no) [0-9]{2}"}, logprobs=0,
                       sampling=SamplingConfig(temperature=1.0, seed=2, logit_bias={banned: 100}))
        assert re.fullmatch("(yes|no) [0-9]{2}", g.text) and g.finish_reason is FinishReason.STOP
        same = m.generate("hi", max_new_tokens=12, response_format={"type": "regex", "regex": "(yes|no) [0-9]{2}"},
                          logprobs=0, sampling=SamplingConfig(temperature=1.0, seed=2, logit_bias={banned: 100}))
        assert same.text == g.text  # OpenAI's name for the same setting
        seen = []
        list(m.steps([m.encode("hi")], max_new_tokens=1, on_logits=seen.append))
        raw = seen[0][0, -1].astype(np.float64)  # the first position's logits, unmasked
        first = g.logprobs[0]
        want = raw[first.token_id] - np.log(np.exp(raw - raw.max()).sum()) - raw.max()
        assert first.token_id != banned and abs(first.logprob - want) < 1e-4


# ---------------------------------------------------------------------- the HTTP server
class Server:
    def __init__(self, artifact, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "llamaexport.cli", "serve", str(artifact), "--port",
                                      str(self.port), *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("server did not start")

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def tiny_server(tiny_artifact):
    s = Server(tiny_artifact, "--chat-format", "chatml", "--max-batch", "4", "--model-name", "tiny")
    yield s
    rc, err = s.stop()
    assert rc == 0, err
    assert "Traceback" not in err, err


def test_openai_client_matches_the_runtime(tiny_server, tiny_artifact):
    """Non-streamed and streamed, chat and completions, through the openai package: the greedy text
    equals LlamaModel.generate (what `llamaexport run` prints) and usage adds up."""
    c = tiny_server.client()
    with LlamaModel.load(tiny_artifact) as m:
        want = m.generate("the quick brown", max_new_tokens=12)
        want_chat = m.generate("hello there", max_new_tokens=12, chat="chatml")
    r = c.completions.create(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == {"length": "length"}.get(want.finish_reason, "stop")
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = c.completions.create(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == want.text

    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                  max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want_chat.text
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want_chat.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(want_chat.token_ids)
    assert [mdl.id for mdl in c.models.list()] == ["tiny"]

    # seeded sampling repeats itself
    kw = dict(model="tiny", prompt="the quick", max_tokens=10, temperature=0.9, top_p=0.9, seed=11)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


def test_concurrent_streams_and_metrics(tiny_server):
    """Six concurrent streaming clients (more than --max-batch 4): every stream equals its
    sequential result, ends with [DONE], and /metrics is back at zero active sequences."""
    prompts = [f"the quick {w} fox" for w in ("brown", "lazy", "red", "old", "new", "big")]
    body = dict(model="tiny", max_tokens=20, temperature=0, ignore_eos=True)
    want = [httpx.post(tiny_server.url + "/v1/completions", json={**body, "prompt": p}, timeout=60).json()
            ["choices"][0]["text"] for p in prompts]
    got = [None] * len(prompts)

    def client(i):
        text, lines = "", []
        with httpx.stream("POST", tiny_server.url + "/v1/completions", json={**body, "prompt": prompts[i],
                                                                               "stream": True}, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
        assert lines[-1] == "[DONE]"
        for d in lines[:-1]:
            text += json.loads(d)["choices"][0]["text"]
        got[i] = text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    metrics = httpx.get(tiny_server.url + "/metrics").text
    assert "llamaexport_active_sequences 0.0" in metrics
    assert "llamaexport_queued_requests 0.0" in metrics
    assert 'llamaexport_requests_total{endpoint="completions",status="200"}' in metrics
    assert "llamaexport_time_to_first_token_seconds_count" in metrics
    assert "llamaexport_inter_token_latency_seconds_bucket" in metrics


def test_openai_client_n_choices_logit_bias_echo_and_logprobs(tiny_server, tiny_artifact):
    """Through the openai package: n choices (greedy: identical; seeded: choice i is what seed + i gives
    alone; usage counts the prompt once), streamed by index; logit_bias -100 bans the greedy token and +100
    forces one (as LlamaModel does with the same bias); echo puts the prompt first; logprobs parse into the
    package's types; n beyond the slots is a 400 naming the field."""
    c = tiny_server.client()
    kw = dict(model="tiny", prompt="the quick brown", max_tokens=8)
    one = c.completions.create(**kw, temperature=0)
    three = c.completions.create(**kw, temperature=0, n=3)
    assert [(ch.index, ch.text) for ch in three.choices] == [(i, one.choices[0].text) for i in range(3)]
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    seeded = c.completions.create(**kw, temperature=1.0, seed=21, n=3)
    alone = [c.completions.create(**kw, temperature=1.0, seed=21 + i).choices[0].text for i in range(3)]
    assert [ch.text for ch in seeded.choices] == alone and len(set(alone)) == 3
    msgs = [{"role": "user", "content": "hello there"}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0.8, seed=5, n=2)
    streamed = {0: "", 1: ""}
    for ch in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0.8, seed=5, n=2,
                                        stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == {ch.index: ch.message.content for ch in whole.choices}

    with LlamaModel.load(tiny_artifact) as m:
        greedy = m.generate("the quick brown", max_new_tokens=8)
        fox = m.tokenizer.encode("fox", add_bos=False)[-1]
        ban, force = {greedy.token_ids[0]: -100}, {fox: 100}
        banned = m.generate("the quick brown", max_new_tokens=8, sampling=SamplingConfig(logit_bias=ban))
        forced = m.generate("the quick brown", max_new_tokens=3, sampling=SamplingConfig(logit_bias=force))
    assert one.choices[0].text == greedy.text
    r = c.completions.create(**kw, temperature=0, logit_bias={str(k): v for k, v in ban.items()})
    assert r.choices[0].text == banned.text != greedy.text and banned.token_ids[0] != greedy.token_ids[0]
    r = c.completions.create(**{**kw, "max_tokens": 3}, temperature=0.7, logit_bias={str(fox): 100})
    assert r.choices[0].text == forced.text and forced.token_ids == [fox] * 3 and "fox" in forced.text

    r = c.completions.create(**kw, temperature=0, echo=True, logprobs=2)
    assert r.choices[0].text == "the quick brown" + greedy.text
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.text_offset) == one.usage.prompt_tokens + 8
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    assert [len(t.top_logprobs) for t in r.choices[0].logprobs.content] == [3] * 4
    with pytest.raises(openai.BadRequestError, match="raise --max-batch") as e:
        c.completions.create(**kw, n=9)
    assert e.value.param == "n"


# ---------------------------------------------------------------------- the app in this process
# Request validation needs no socket: the app `serve` runs (server.create_app) over an engine of the tiny
# model, requests through httpx.ASGITransport. What needs a real server (the openai client against it,
# streaming, concurrency, disconnects, shutdown) uses Server above.
@pytest.fixture(scope="module")
def tiny_app(tiny_artifact):
    """.app: as tiny_server (--chat-format chatml --max-batch 4 --model-name tiny); .keyed: --api-key sekret."""
    from llamaexport.serving.server import create_app

    with LlamaModel.load(tiny_artifact) as m:
        engine = Engine(m, max_batch=4)
        engine.start()
        yield types.SimpleNamespace(app=create_app(engine, model_name="tiny", chat_format="chatml"),
                                    keyed=create_app(engine, model_name="tiny", api_key="sekret"))
        engine.close()


def asgi(app, method, path, **kw) -> "httpx.Response":
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


def asgi_openai(app, call, api_key="none"):
    """await call(client): an openai.AsyncOpenAI client on the app."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            return await call(openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=api_key, max_retries=0,
                                                 http_client=http))
    return asyncio.run(go())


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens must be a whole number"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be a whole number >= 1"),
    ({"prompt": "hi", "model": "gpt-4"}, 400, "unknown model 'gpt-4'"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature must be a number"),
    ({"prompt": "hi", "n": 0}, 400, "n must be a whole number >= 1"),
    ({"prompt": "hi", "logprobs": 6}, 400, "logprobs must be a whole number from 0 to 5"),
    ({"prompt": "hi", "stop": [1]}, 400, "stop must be"),
    ({"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty must be a number from -2.0 to 2.0"),
    ({"prompt": 42}, 400, "prompt must be"),
    ({"prompt": [1, 999999]}, 400, "token ids must be in"),
    ({"prompt": "word " * 400}, 400, "context"),
    ({"prompt": "hi", "max_tokens": 10000}, 400, "ask for at most"),
    ({"prompt": "hi", "stream": True, "stream_options": True}, 400, "stream_options must be"),
    ({"prompt": "hi", "temperature": 10 ** 400}, 400, "temperature must be a number"),
    (b"[" * 100000 + b"]" * 100000, 400, "not valid JSON"),
    (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
])
def test_bad_completions_requests(tiny_app, body, status, fragment):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = asgi(tiny_app.app, "POST", "/v1/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    health = asgi(tiny_app.app, "GET", "/health")
    assert health.status_code == 200 and health.json()["active"] == 0  # still serving, nothing left running


@pytest.mark.parametrize("endpoint,body,param,fragment", [
    ("completions", {"logprobs": 6}, "logprobs", "logprobs must be a whole number from 0 to 5, got 6"),
    ("completions", {"logprobs": True}, "logprobs", "logprobs must be a whole number"),
    ("completions", {"n": 5}, "n", "n=5 choices need 5 KV-cache slots at once, and this engine has 4 (serve --max-batch 4)"),
    ("completions", {"logit_bias": {"512": 5}}, "logit_bias",
     "logit_bias key '512' is not a token id of this model's vocabulary (0 .. 511)"),
    ("completions", {"logit_bias": {"the": 5}}, "logit_bias", "logit_bias key 'the' is not a token id"),
    ("completions", {"logit_bias": {"7": -101}}, "logit_bias", "logit_bias['7'] must be a number from -100 to 100"),
    ("completions", {"logit_bias": [7]}, "logit_bias", "logit_bias must be an object"),
    ("completions", {"echo": "yes"}, "echo", "echo must be true or false"),
    ("completions", {"suffix": "x"}, "suffix", "suffix (fill in the middle) is not supported"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs must be a whole number from 0 to 20"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ("chat", {"logprobs": False, "top_logprobs": 0}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ("chat", {"logprobs": 1}, "logprobs", "logprobs must be true or false"),
    ("chat", {"n": 9}, "n", "raise --max-batch"),
    ("chat", {"logit_bias": {"-3": 1}}, "logit_bias", "logit_bias key '-3'"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format", "response_format must be"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integr"}}}},
     "response_format", "response_format.json_schema.schema at /: "),
    ("chat", {"tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strin"}}}}}]}, "tools", "tools[0].function.parameters at /properties/x"),
    ("chat", {"grammar": "root ::= x"}, "grammar", "grammar is a /v1/completions parameter"),
    ("chat", {"regex": "a+"}, "regex", "regex is a /v1/completions parameter"),
    ("chat", {"functions": [{"name": "f"}]}, "functions", "use 'tools'"),
    ("chat", {"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos cannot"),
    ("completions", {"tools": []}, "tools", "tools is a /v1/chat/completions parameter"),
    ("completions", {"regex": "(a"}, "regex", "regex: "),
])
def test_bad_parameters_name_the_field(tiny_app, endpoint, body, param, fragment):
    """What a request asks of logprobs, n, logit_bias, echo, structured output and tools is checked (and its
    grammar compiled) before it reaches the engine, and the fields still refused (the legacy functions,
    suffix) say so: OpenAI's error JSON with `param` naming the field."""
    base = {"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = asgi(tiny_app.app, "POST", f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", json={**base, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["param"] == param and err["type"] == "invalid_request_error", err
    assert asgi(tiny_app.app, "GET", "/health").json()["active"] == 0


def _log_softmax(m, ids) -> np.ndarray:
    """The reference logprobs: log-softmax of the logits the model's backend computes at every position of `ids`
    in one forward (a fresh cache) [S, V]; row j gives the logprobs of the id after position j."""
    logits, _ = m.backend.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                                  m.backend.empty_cache(1))
    x = logits[0].astype(np.float64)
    x -= x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def _data(r) -> list[dict]:
    """A streamed answer's chunks (the SSE data before [DONE])."""
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(d) for d in lines[:-1]]


def _alike(a, b):
    """Two answers' logprobs (lists, or lists in dicts, of tokens and floats) are the same tokens with the same
    logprobs to 1e-5: a second request reuses the first's cached prompt, whose last token's forward rounds
    differently in the last bits."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _alike(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _alike(x, y)
    else:
        assert a == b


def test_chat_logprobs_are_the_models_and_stream_with_the_text(tiny_app, tiny_artifact):
    """Greedy chat logprobs: each token is its bytes (and their text), its logprob the model's raw log-softmax at
    its position, its top_logprobs the most likely ids, sorted, the chosen one first; the bytes join to the
    message; the streamed chunks' lists concatenate to the whole answer's."""
    with LlamaModel.load(tiny_artifact) as m:
        want = m.generate("hello there", chat="chatml", max_new_tokens=10)
        prompt = m.encode(m.format_prompt("hello there", chat="chatml"))
        ids = [t for t in want.token_ids if t not in m.tokenizer.eos_ids]
        ref, tok = _log_softmax(m, prompt + ids), m.tokenizer
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10, "temperature": 0,
            "logprobs": True, "top_logprobs": 4}
    answer = asgi(tiny_app.app, "POST", "/v1/chat/completions", json=body).json()["choices"][0]
    content = answer["logprobs"]["content"]
    assert answer["message"]["content"] == want.text and len(content) == len(ids) and answer["logprobs"]["refusal"] is None
    for j, (entry, tid) in enumerate(zip(content, ids)):
        row = ref[len(prompt) - 1 + j]
        assert entry["bytes"] == list(tok.token_bytes(tid)) and entry["token"] == tok.token_bytes(tid).decode(errors="replace")
        assert entry["logprob"] == pytest.approx(row[tid], abs=1e-4)
        tops = entry["top_logprobs"]
        np.testing.assert_allclose([t["logprob"] for t in tops], np.sort(row)[::-1][:4], atol=1e-4)
        assert tops[0] == {k: entry[k] for k in ("token", "logprob", "bytes")}
    assert b"".join(bytes(e["bytes"]) for e in content).decode(errors="replace") == want.text
    chunks = _data(asgi(tiny_app.app, "POST", "/v1/chat/completions", json={**body, "stream": True}))
    _alike([e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]], content)
    plain = asgi(tiny_app.app, "POST", "/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None})
    assert plain.json()["choices"][0]["logprobs"] is None


def test_completion_logprobs_and_echo(tiny_app, tiny_artifact):
    """The completions shape: tokens, token_logprobs, top_logprobs (dicts holding the chosen token: at most
    logprobs + 1 entries), text_offset into the text; with echo the prompt comes first, its first token's
    logprob null and the others' the model's; streamed, the echo is the first chunk and the lists
    concatenate to the whole answer's."""
    with LlamaModel.load(tiny_artifact) as m:
        want = m.generate("the quick brown", max_new_tokens=6)
        prompt = m.encode("the quick brown")
        ids = prompt + [t for t in want.token_ids if t not in m.tokenizer.eos_ids]
        ref = _log_softmax(m, ids)
    body = {"prompt": "the quick brown", "max_tokens": 6, "temperature": 0, "logprobs": 3, "echo": True}
    choice = asgi(tiny_app.app, "POST", "/v1/completions", json=body).json()["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert text == "the quick brown" + want.text and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    for j in range(1, len(ids)):
        top = lp["top_logprobs"][j]
        assert lp["tokens"][j] in top and len(top) <= 4 and max(top.values()) == pytest.approx(ref[j - 1].max(), abs=1e-4)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][len(prompt)] == len("the quick brown")
    chunks = _data(asgi(tiny_app.app, "POST", "/v1/completions", json={**body, "stream": True}))
    assert chunks[0]["choices"][0]["text"] == "the quick brown"
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        _alike([v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"][key]], lp[key])
    plain = asgi(tiny_app.app, "POST", "/v1/completions", json={**body, "logprobs": None}).json()["choices"][0]
    assert plain["text"] == text and plain["logprobs"] is None


def test_bad_chat_requests_and_routes(tiny_app):
    app = tiny_app.app
    for body, fragment in [({"messages": []}, "non-empty list"),
                           ({"messages": [{"role": "wizard", "content": "x"}]}, "role must be one of"),
                           ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text"),
                           ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
                            "tools[0] must be {'type': 'function'"),
                           ({"messages": [{"role": "user", "content": "x"},
                                          {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
                            "messages[1].tool_calls[0] must be")]:
        r = asgi(app, "POST", "/v1/chat/completions", json=body)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    r = asgi(app, "GET", "/v1/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    r = asgi(app, "GET", "/v1/chat/completions")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        asgi_openai(app, lambda c: c.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}]))


# ---------------------------------------------------------------------- structured output and tool calls
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def _forecast_model():
    import typing

    import pydantic

    class Forecast(pydantic.BaseModel):
        city: typing.Literal["Paris", "Rome"]
        sunny: bool
        celsius: int = pydantic.Field(ge=-20, le=40)
    return Forecast


def test_structured_output_on_the_tiny_model(tiny_app):
    """response_format through the openai client: beta...parse(response_format=PydanticModel) gives the parsed
    object (random weights, yet valid by construction); max_tokens hit mid-JSON says "length"; a bad schema
    is a 400 naming its part; completions take a regex and a GBNF grammar."""
    import re

    Forecast = _forecast_model()
    msgs = [{"role": "user", "content": "Weather in Paris?"}]

    async def parse(c):
        return await c.beta.chat.completions.parse(model="tiny", messages=msgs, response_format=Forecast,
                                                   max_tokens=60, temperature=0.7, seed=1)
    r = asgi_openai(tiny_app.app, parse)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Forecast), r.choices[0].message.content

    async def cut(c):
        return await c.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                               response_format={"type": "json_object"})
    r = asgi_openai(tiny_app.app, cut)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integr"}}}}}
    resp = asgi(tiny_app.app, "POST", "/v1/chat/completions", json={"messages": msgs, "response_format": bad})
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["param"] == "response_format" and "/properties/n" in err["message"], err
    for body, param in (({"prompt": "x", "regex": "(a"}, "regex"), ({"prompt": "x", "grammar": "root ::= ("}, "grammar"),
                        ({"prompt": "x", "regex": "a", "grammar": 'root ::= "a"'}, "regex"),
                        ({"messages": msgs, "regex": "a"}, "regex"),
                        ({"messages": msgs, "tools": [WEATHER], "response_format": {"type": "json_object"}},
                         "response_format")):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        resp = asgi(tiny_app.app, "POST", path, json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.json()

    for body, pattern in (({"regex": "(yes|no) [0-9]{2}"}, "(yes|no) [0-9]{2}"),
                          ({"grammar": 'root ::= ("a" | "b") [0-9] [0-9]?'}, "[ab][0-9][0-9]?")):
        resp = asgi(tiny_app.app, "POST", "/v1/completions",
                    json={"prompt": "Answer:", "max_tokens": 20, "temperature": 1.0, "seed": 3, **body})
        text = resp.json()["choices"][0]["text"]
        assert re.fullmatch(pattern, text) and resp.json()["choices"][0]["finish_reason"] == "stop", resp.json()


def _reassemble(chunks) -> tuple[str | None, list[dict], str]:
    """Streamed chat chunks -> (content, tool calls, finish_reason)."""
    content, calls, reason = "", {}, None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] = (tc.function.name if tc.function else None) or call["name"]
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
        reason = ch.choices[0].finish_reason or reason
    return content or None, [calls[i] for i in sorted(calls)], reason


@pytest.fixture(scope="module")
def tiny_long_engine(tmp_path_factory, tiny_artifact):
    """An engine over the tiny model built with a 2048-token context (a tool list's prompt outgrows 256; the
    llama3 format's, spelled by the tiny byte-level vocabulary, 1024)."""
    from llamaexport.build.pipeline import build

    art = build(out=tmp_path_factory.mktemp("long") / "art", size="tiny", seed=7, max_seq_len=2048,
                tokenizer=str(tiny_artifact / "tokenizer.model"), progress=False)
    with LlamaModel.load(art) as m:
        engine = Engine(m, max_batch=4)
        engine.start()
        yield engine
        engine.close()


# each chat format's tool-call format: chatml -> hermes <tool_call>, llama3 -> JSON, llama2 -> mistral [TOOL_CALLS]
@pytest.mark.parametrize("chat_format", ["chatml", "llama3", "llama2"])
def test_tool_round_trip_on_the_tiny_model(tiny_long_engine, chat_format):
    """tool_choice "required" through the openai client: the reply is parsed into tool_calls (content null,
    finish_reason "tool_calls"), its streamed deltas reassemble to the same call, and the call and its
    result go back as history (an assistant message with tool_calls, a tool message) for the next answer."""
    from llamaexport.serving.server import create_app

    app = create_app(tiny_long_engine, model_name="tiny", chat_format=chat_format)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(model="tiny", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=200,
              temperature=0)

    async def call(c):
        whole = await c.chat.completions.create(messages=msgs, **kw)
        chunks = [ch async for ch in await c.chat.completions.create(messages=msgs, stream=True, **kw)]
        return whole, chunks
    whole, chunks = asgi_openai(app, call)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tc,) = choice.message.tool_calls
    args = json.loads(tc.function.arguments)
    assert tc.function.name == "get_weather" and args["city"] in ("Paris", "Rome") and tc.id
    content, calls, reason = _reassemble(chunks)
    assert (content, reason) == (None, "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", args)]

    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                      {"role": "tool", "tool_call_id": tc.id, "content": '{"celsius": 21}'}]

    async def answer(c):
        return await c.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=8,
                                               temperature=0)  # tool_choice "auto": free text or a call
    a = asgi_openai(app, answer)
    assert a.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the tools, the call and its result were rendered: the prompt outgrew the first turn's by them
    assert a.usage.prompt_tokens > whole.usage.prompt_tokens + 20


@pytest.mark.parametrize("chat_format", ["chatml", "llama2"])
def test_n_choices_of_parallel_tool_calls(tiny_long_engine, chat_format):
    """n=3 sampled choices under tool_choice "required" with parallel calls allowed (the prompt's KV shared):
    each choice is its own list of calls (one or more, each with its own id), every call's arguments valid for
    its function, and
    the streamed deltas of each choice (told apart by index) reassemble to the same calls."""
    import jsonschema

    from llamaexport.serving.server import create_app

    app = create_app(tiny_long_engine, model_name="tiny", chat_format=chat_format)
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}}
    tools = [WEATHER, add]
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Rome, and 2+2?"}], tools=tools,
              tool_choice="required", n=3, max_tokens=600, temperature=1.0, seed=11)

    async def go(c):
        whole = await c.chat.completions.create(**kw)
        chunks = [ch async for ch in await c.chat.completions.create(stream=True, **kw)]
        return whole, chunks
    whole, chunks = asgi_openai(app, go)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert sorted(c.index for c in whole.choices) == [0, 1, 2]
    for choice in whole.choices:
        # random weights may go on calling until max_tokens ("length"); the calls completed by then are parsed
        assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls, choice
        ids = [tc.id for tc in choice.message.tool_calls]
        assert len(set(ids)) == len(ids)
        for tc in choice.message.tool_calls:
            jsonschema.validate(json.loads(tc.function.arguments), params[tc.function.name])
    for i, choice in enumerate(whole.choices):
        mine = [ch for ch in chunks if ch.choices and ch.choices[0].index == i]
        _, calls, reason = _reassemble(mine)
        assert reason == choice.finish_reason
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            (tc.function.name, json.loads(tc.function.arguments)) for tc in choice.message.tool_calls]


def test_without_llguidance_constraints_are_a_400_naming_the_extra(tiny_long_engine, monkeypatch):
    """A server installed without the structured extra: response_format, grammar and tools are each a 400
    that says what to install; plain requests are still served."""
    from llamaexport.serving.server import create_app

    app = create_app(tiny_long_engine, model_name="tiny", chat_format="chatml")  # its own, empty grammar cache
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    msgs = [{"role": "user", "content": "Hi"}]
    for path, body in (("/v1/chat/completions", {"messages": msgs, "response_format": {"type": "json_object"}}),
                       ("/v1/chat/completions", {"messages": msgs, "tools": [WEATHER], "tool_choice": "required"}),
                       ("/v1/completions", {"prompt": "x", "regex": "[0-9]+"})):
        r = asgi(app, "POST", path, json={**body, "max_tokens": 4})
        assert r.status_code == 400, r.text
        assert "pip install 'llamaexport[structured]'" in r.json()["error"]["message"], r.json()
    r = asgi(app, "POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_api_key(tiny_app):
    app = tiny_app.keyed
    assert asgi(app, "GET", "/health").status_code == 200  # no key needed
    for path in ("/v1/models", "/metrics"):
        r = asgi(app, "GET", path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = asgi(app, "POST", "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        asgi_openai(app, lambda c: c.models.list())
    assert [m.id for m in asgi_openai(app, lambda c: c.models.list(), api_key="sekret").data] == ["tiny"]
    assert asgi_openai(app, lambda c: c.completions.create(model="tiny", prompt="hi", max_tokens=2), api_key="sekret").usage


def test_serve_passes_the_api_key_to_the_app(tiny_artifact, monkeypatch):
    """`serve --api-key` (and LLAMAEXPORT_API_KEY) reach the app `serve` runs: taken from uvicorn instead of
    listening, it answers 401 without the key."""
    import uvicorn
    from conftest import run_cli

    apps = []

    def run(self, sockets=None):
        apps.append(self.config.app)
        self.started = True  # what uvicorn sets once it listens; serve then returns as after a shutdown

    monkeypatch.setattr(uvicorn.Server, "run", run)
    for args, env in ((["--api-key", "sekret"], None), ([], "sekret")):
        if env:
            monkeypatch.setenv("LLAMAEXPORT_API_KEY", env)
        r = run_cli("serve", tiny_artifact, "--model-name", "tiny", "--port", free_port(), *args)
        assert r.returncode == 0 and "server stopped" in r.stderr, r.stderr
        assert asgi(apps[-1], "GET", "/v1/models").status_code == 401
        r = asgi(apps[-1], "GET", "/v1/models", headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"


def test_serve_uses_the_chat_format_recorded_at_build(tiny_artifact, tmp_path):
    """Without --chat-format, /v1/chat/completions renders messages in the manifest's format."""
    from llamaexport.build.pipeline import build

    art = build(out=tmp_path / "koala", size="tiny", seed=7, tokenizer=str(tiny_artifact / "tokenizer.model"),
                chat_format="koala", progress=False)
    with LlamaModel.load(art) as m:
        want = len(m.encode("BEGINNING OF CONVERSATION: USER: Hi GPT:"))
    s = Server(art)
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == want
    finally:
        rc, err = s.stop()
    assert rc == 0 and "chat format koala" in err, err


def test_port_in_use_is_one_clear_error(tiny_server, tiny_artifact, monkeypatch):
    """In this process (conftest.run_cli): each is refused before serving; were one not, uvicorn's run
    fails the test instead of serving forever."""
    import uvicorn
    from conftest import assert_clean_error, run_cli

    def run(self, sockets=None):
        pytest.fail("serve got past its checks")

    monkeypatch.setattr(uvicorn.Server, "run", run)
    r = run_cli("serve", tiny_artifact, "--port", tiny_server.port)
    assert_clean_error(r, f"cannot listen on 127.0.0.1:{tiny_server.port}", "pick another --port")
    # the serving limits are checked before the model loads
    for args, fragment in ((["--max-batch", "0"], "max_batch must be a whole number >= 1"),
                           (["--prefill-chunk", "-3"], "prefill_chunk must be a whole number >= 1"),
                           (["--port", "70000"], "port must be 1 to 65535"),
                           (["--host", "name.invalid"], "cannot listen on name.invalid")):
        assert_clean_error(run_cli("serve", tiny_artifact, "--port", free_port(), *args), fragment)


# ---------------------------------------------------------------------- SmolLM2: real text
@pytest.fixture(scope="module")
def smol_art(smol_build):
    return smol_build()


QUESTIONS = ["What is the capital of France?", "Write a haiku about rivers.", "Explain photosynthesis briefly.",
             "List three prime numbers.", "Who wrote Hamlet?", "What is 12 times 7?"]


def _chat_ids(m):
    from llamaexport.model.chat import format_chat
    return [m.encode(format_chat([{"role": "user", "content": q}], tokenizer=m.tokenizer)) for q in QUESTIONS]


def test_smollm2_batched_equals_alone(smol_art):
    """Real text, fp32: six chat requests through four slots (chunked prefill, batched decode) give
    exactly the tokens each gives alone."""
    with LlamaModel.load(smol_art) as m:
        prompts = _chat_ids(m)
        alone = [m.generate_ids([p], max_new_tokens=40, eos_ids=[])[0] for p in prompts]
        engine = Engine(m, max_batch=4, prefill_chunk=16)
        out = _run_all(engine, prompts, max_new_tokens=40, eos_ids=[])
        assert [out[i][0] for i in range(len(prompts))] == alone
        engine.close()


def test_smollm2_int8_batched_decode_keeps_its_accuracy(smol_art, smol_build):
    """MatMulNBits rounds a one-row product differently from a several-row one (measured: up to ~1 logit
    on SmolLM2 int8), so a batched int8 stream may leave the greedy path of the same request alone at a
    close call. Its accuracy must not suffer: teacher-forced, the KL to the fp32 artifact of a decode step
    run for six rows at once is as small as that of each row run alone."""
    int8 = smol_build(profile="cpu", precision="int8", export_only=False)

    def step_logits(art):
        with LlamaModel.load(art) as m:
            prompts = _chat_ids(m)
            n = min(map(len, prompts))
            slots = make_slots(m.backend, 6)
            slots.prefill_rows(0, [p[:n] for p in prompts])
            nxt = [p[n] if len(p) > n else p[-1] for p in prompts]
            batched = slots.decode(list(range(6)), nxt)
            alone = []
            for i in range(6):
                slots.truncate(i, n)
                alone.append(slots.decode([i], [nxt[i]])[0])
            return batched, np.stack(alone)

    def kl(p, q):
        lp = p - p.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        lq = q - q.max(1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        return float((np.exp(lp) * (lp - lq)).sum(1).mean())

    ref_batched, ref_alone = step_logits(smol_art)
    np.testing.assert_array_equal(ref_batched, ref_alone)  # fp32: batch-invariant
    batched, alone = step_logits(int8)
    assert kl(ref_alone, batched) <= 1.25 * kl(ref_alone, alone) + 1e-3, (kl(ref_alone, batched), kl(ref_alone, alone))


@pytest.fixture(scope="module")
def smol_server(smol_art):
    s = Server(smol_art, "--max-batch", "1", "--max-queue", "0")
    yield s
    rc, err = s.stop()
    assert rc == 0, err


def test_smollm2_chat_equals_run_and_reuses_history(smol_art, smol_server):
    r = subprocess.run([sys.executable, "-m", "llamaexport.cli", "run", str(smol_art), "--prompt",
                        "What is the capital of France?", "--chat", "--max-new-tokens", "24"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    c = smol_server.client()
    name = c.models.list().data[0].id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    a = c.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0)
    assert a.choices[0].message.content == r.stdout.rstrip("\n")
    assert "Paris" in a.choices[0].message.content
    msgs += [{"role": "assistant", "content": a.choices[0].message.content},
             {"role": "user", "content": "And of Germany?"}]
    b = c.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0)
    # the second turn prefilled only what was new ...
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens
    with LlamaModel.load(smol_art) as m:  # ... and says what a fresh run says
        from llamaexport.model.chat import format_chat
        ids = m.encode(format_chat(msgs, tokenizer=m.tokenizer))
        want = m.tokenizer.decode(m.generate_ids([ids], max_new_tokens=24)[0])
    assert b.choices[0].message.content == want
    assert "Berlin" in b.choices[0].message.content


def test_smollm2_logprobs_spell_the_answer_and_stop_with_it(smol_art, smol_server):
    """Real text: the reported tokens' bytes join to the answer and their logprobs are the model's; a stop string
    ends the reported tokens where it ends the text; n beyond --max-batch 1 is a 400 naming it."""
    from llamaexport.model.chat import format_chat

    c = smol_server.client()
    name = c.models.list().data[0].id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3)
    text, lps = r.choices[0].message.content, r.choices[0].logprobs.content
    assert "Paris" in text and b"".join(bytes(t.bytes) for t in lps).decode() == text
    with LlamaModel.load(smol_art) as m:
        prompt = m.encode(format_chat(msgs, tokenizer=m.tokenizer))
        ids = m.generate_ids([prompt], max_new_tokens=24)[0]
        ref = _log_softmax(m, prompt + ids)
    for j, t in enumerate(lps):
        assert t.logprob == pytest.approx(ref[len(prompt) - 1 + j, ids[j]], abs=1e-3)
        assert t.top_logprobs[0].token == t.token and [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
    stop = lps[4].token + lps[5].token  # cut before the fifth token's text
    cut = c.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0, logprobs=True, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert [t.token for t in cut.choices[0].logprobs.content] == [t.token for t in lps[:4]]
    with pytest.raises(openai.BadRequestError, match=r"this engine has 1 \(serve --max-batch 1\)") as e:
        c.chat.completions.create(model=name, messages=msgs, max_tokens=2, n=2)
    assert e.value.param == "n"


def test_queue_limit_and_disconnect(smol_server):
    """One slot, no queue: while a long stream runs another request gets 429 with Retry-After;
    a client that leaves mid-stream frees the slot at once."""
    url = smol_server.url
    long = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        while not next(lines).startswith("data: "):  # wait until it runs
            pass
        busy = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert busy.status_code == 429, busy.text
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "rate_limit_exceeded"
    t0 = time.monotonic()  # left after a token or two of 1000
    while httpx.get(url + "/health").json()["active"]:
        assert time.monotonic() - t0 < 5, "the abandoned generation still holds its slot"
        time.sleep(0.05)
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    # a non-streamed client that gives up is noticed too, while tokens are still flowing
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**long, "stream": False}, timeout=1.0)
    t0 = time.monotonic()
    while httpx.get(url + "/health").json()["active"]:
        assert time.monotonic() - t0 < 5, "the abandoned non-streamed generation still holds its slot"
        time.sleep(0.05)
    metrics = httpx.get(url + "/metrics").text
    assert 'llamaexport_requests_total{endpoint="completions",status="429"} 1.0' in metrics


def test_sigterm_gives_running_requests_a_grace_then_exits_0(smol_art):
    """SIGTERM with a long stream and a long non-streamed request running: the stream goes on through
    the grace period, then ends with an error chunk and [DONE]; the waiting request gets a 503; the
    server exits 0 within seconds."""
    s = Server(smol_art, "--max-batch", "2")
    long = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    lines, whole = [], {}

    def client():
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=60) as r:
            lines.extend(r.iter_lines())

    def waiting_client():
        whole["r"] = httpx.post(s.url + "/v1/completions", json={**long, "stream": False}, timeout=60)

    threads = [threading.Thread(target=client), threading.Thread(target=waiting_client)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    before = len(lines)
    rc, err = s.stop()
    for t in threads:
        t.join(timeout=30)
    assert rc == 0 and "Traceback" not in err, err
    assert time.monotonic() - t0 < 15
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and "shutting down" in data[-2], data[-3:]
    assert len(lines) - before > 20  # it kept streaming through the grace period
    r = whole["r"]
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text


def test_chat_repl(smol_art):
    """`llamaexport chat`: the answer equals `run --chat`, the second turn reuses the first's
    cache, /system and /reset work, Ctrl-D exits 0."""
    r = subprocess.run([sys.executable, "-m", "llamaexport.cli", "run", str(smol_art), "--prompt",
                        "What is the capital of France?", "--chat", "--max-new-tokens", "24"],
                       capture_output=True, text=True, timeout=300)
    lines = ["What is the capital of France?", "/stats", "And of Germany?", "/stats", "/system Be brief.",
             "/reset", "/bogus", "/help"]
    p = subprocess.run([sys.executable, "-m", "llamaexport.cli", "chat", str(smol_art), "--max-new-tokens", "24"],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert ">>> " + r.stdout.rstrip("\n") + "\n" in out
    stats = [line for line in out.splitlines() if "last answer:" in line]
    assert len(stats) == 2 and "(0 reused from the cache)" in stats[0]
    reused = int(stats[1].split("(")[1].split()[0])
    assert reused > 20, stats[1]
    assert "(system prompt set; conversation cleared)" in out and "(conversation cleared)" in out
    assert "unknown command /bogus" in out and "/reset" in out


def test_chat_repl_ctrl_c_stops_the_answer_not_the_program(smol_art):
    p = subprocess.Popen([sys.executable, "-m", "llamaexport.cli", "chat", str(smol_art), "--max-new-tokens", "400"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0)
    p.stdin.write("Write a very long story about a dragon.\n")
    p.stdin.flush()
    seen = ""
    while ">>> " not in seen or len(seen.split(">>> ", 1)[1]) < 20:  # the answer has started
        seen += p.stdout.read(1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate("/stats\n", timeout=120)
    assert p.returncode == 0, err
    assert "(stopped)" in out and "interrupted" in out, out


FORECAST_SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"},
                                                    "celsius": {"type": "integer", "minimum": -20, "maximum": 40}},
                   "required": ["city", "sunny", "celsius"]}


def test_run_follows_a_schema_a_regex_or_a_grammar(tiny_artifact, tmp_path):
    """`run --json-schema FILE | --grammar FILE | --regex RE` (and chat's): the same constrained path as the server."""
    import re

    import jsonschema
    from conftest import assert_clean_error, run_cli

    schema = tmp_path / "forecast.json"
    schema.write_text(json.dumps(FORECAST_SCHEMA))
    base = ["run", tiny_artifact, "--prompt", "Weather?", "--max-new-tokens", "80", "--temperature", "0.7", "--seed", "1"]
    r = run_cli(*base, "--json-schema", schema)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), FORECAST_SCHEMA)
    r = run_cli(*base, "--regex", "(yes|no) [0-9]{2}")
    assert r.returncode == 0 and re.fullmatch("(yes|no) [0-9]{2}\n", r.stdout), (r.stdout, r.stderr)
    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text('root ::= ("a" | "b") [0-9]\n')
    r = run_cli(*base, "--grammar", gbnf)
    assert r.returncode == 0 and re.fullmatch("[ab][0-9]\n", r.stdout), (r.stdout, r.stderr)
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integr"}}}))
    assert_clean_error(run_cli(*base, "--json-schema", schema), f"--json-schema {schema} at /properties/n: ")
    assert_clean_error(run_cli(*base, "--regex", "a", "--grammar", gbnf), "at most one of")
    r = run_cli("chat", tiny_artifact, "--chat-format", "chatml", "--regex", "(yes|no) [0-9]{2}", "--temperature", "0.7",
                "--max-new-tokens", "12", input="Sunny?\nAnd tomorrow?\n")
    assert r.returncode == 0 and len(re.findall(r">>> (yes|no) [0-9]{2}\n", r.stdout)) == 2, (r.stdout, r.stderr)


def test_smollm2_structured_output_and_tool_round_trip(smol_art, smol_server, tmp_path):
    """A real model through the openai client: parse(response_format=PydanticModel) gives the object;
    json_object answers parse; tool_choice "required" makes it call the tool, whose result goes back as a
    `tool` message, and it answers in text; `run --json-schema` gives JSON that validates."""
    import jsonschema

    c = smol_server.client()
    name = c.models.list().data[0].id
    Forecast = _forecast_model()
    q = [{"role": "user", "content": "What is the weather like in Paris? Answer in JSON."}]
    r = c.beta.chat.completions.parse(model=name, messages=q, response_format=Forecast, max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Forecast)
    r = c.chat.completions.create(model=name, messages=q, response_format={"type": "json_object"}, max_tokens=120,
                                  temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut at max_tokens: said so, never passed off as complete
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")

    first = c.chat.completions.create(model=name, messages=q, tools=[WEATHER], tool_choice="required", max_tokens=80,
                                      temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    tc = choice.message.tool_calls[0]
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments)["city"] in ("Paris", "Rome")
    history = q + [{"role": "assistant", "content": choice.message.content, "tool_calls": [tc.model_dump()]},
                   {"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "sunny", "celsius": 21}'}]
    chunks = list(c.chat.completions.create(model=name, messages=q, tools=[WEATHER], tool_choice="required",
                                            max_tokens=80, temperature=0, stream=True))
    content, calls, reason = _reassemble(chunks)
    assert reason == "tool_calls" and content == choice.message.content
    assert [(x["name"], x["arguments"]) for x in calls] == [(t.function.name, t.function.arguments)
                                                           for t in choice.message.tool_calls]
    answer = c.chat.completions.create(model=name, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=40,
                                       temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None

    schema = tmp_path / "forecast.json"
    schema.write_text(json.dumps(FORECAST_SCHEMA))
    r = subprocess.run([sys.executable, "-m", "llamaexport.cli", "run", str(smol_art), "--prompt", q[0]["content"],
                        "--chat", "--json-schema", str(schema), "--max-new-tokens", "60"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), FORECAST_SCHEMA)

"""Speculative decoding (runtime.speculative): lossless against plain decoding, token for token when greedy
(prompt lookup and a draft artifact, both graphs, the Python API, the engine, the CLI and the server), the same
distribution when sampling (a goodness-of-fit test against the exact distribution), stops landing exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_clean_error, run_cli

from llamaexport import LlamaExportError
from llamaexport.runtime.engine import DoneEvent, Engine
from llamaexport.runtime.llama_model import LlamaModel
from llamaexport.runtime.sampling import Sampler, SamplingConfig
from llamaexport.runtime.speculative import NgramProposer, SpecStats, Speculation


def _prompts(vocab: int, n: int = 12, seed: int = 0) -> list[list[int]]:
    """Prompts with repeated spans (prompt lookup finds matches) and without."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        span = rng.integers(3, min(vocab, 400), int(rng.integers(3, 9))).tolist()
        noise = rng.integers(3, min(vocab, 400), int(rng.integers(2, 12))).tolist()
        out.append(span * int(rng.integers(1, 4)) + noise + span[: int(rng.integers(1, len(span)))] if i % 3 else noise)
    return out


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory, tiny_artifact):
    """Another tiny model (other random weights) with the tiny artifact's tokenizer: a draft that is often
    wrong, so rejections are exercised."""
    from llamaexport.build.pipeline import build

    return build(out=tmp_path_factory.mktemp("draft") / "art", size="tiny", seed=8,
                 tokenizer=str(tiny_artifact / "tokenizer.model"), progress=False)


def test_ngram_proposer_takes_the_latest_longest_match():
    p = NgramProposer(Speculation("ngram", k=3, ngram=3, ngram_min=2))
    ids = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 2, 3]
    assert p.propose(ids) == ([5, 6, 2], None)  # "2 3" last seen before "5 6 2"; "1 2 3"'s 3-gram suffix is "6 2 3"
    assert p.propose([*ids, 5]) == ([6, 2, 3], None)  # the index grows with the text
    assert p.propose([7, 8]) == ([], None)
    with pytest.raises(LlamaExportError, match="speculative k"):
        Speculation("ngram", k=0)
    with pytest.raises(LlamaExportError, match="needs a draft"):
        Speculation("draft")


@pytest.mark.parametrize("graph", ["gqa", "portable"])
def test_greedy_output_is_plain_decodings_token_for_token(graph, tiny_artifact, tiny_portable, tiny_draft):
    """Many prompts, prompt lookup and two drafts (another model: mostly rejected; the target's own weights:
    always accepted): the greedy tokens equal plain decoding's, EOS and the length included."""
    art, backend = (tiny_artifact, None) if graph == "gqa" else (tiny_portable, "onnxruntime")
    with LlamaModel.load(art, backend=backend) as m, LlamaModel.load(tiny_draft) as other, \
            LlamaModel.load(tiny_artifact) as same:
        prompts = _prompts(m.config.vocab_size)
        stats = {}
        for name, spec in (("ngram", Speculation("ngram", k=5)), ("ngram1", Speculation("ngram", k=3, ngram_min=1)),
                           ("draft", Speculation("draft", k=4, draft=other)),
                           ("self", Speculation("draft", k=3, draft=same))):
            stats[name] = SpecStats()
            for p in prompts:
                for eos in (None, []):
                    want = m.generate_ids([p], max_new_tokens=30, eos_ids=eos)[0]
                    got = [int(t[0]) for t in m.steps([p], max_new_tokens=30, eos_ids=eos, speculative=spec,
                                                      spec_stats=stats[name])]
                    assert got == want, (name, p)
        for name in ("ngram", "ngram1", "self"):  # accepted drafts: several tokens per forward
            assert stats[name].accepted > 0 and stats[name].tokens_per_forward > 1, stats
        assert stats["draft"].accepted < stats["draft"].drafted, stats["draft"]  # rejections happened
        if graph == "gqa":  # its own weights, same graph: every draft is the target's choice
            assert stats["self"].accepted == stats["self"].drafted


def test_stops_eos_and_length_land_where_plain_decoding_puts_them(tiny_artifact):
    """generate(): text, ids and finish reason are the same with a stop string cut mid-draft, at a length
    limit within a verified run, and at EOS."""
    with LlamaModel.load(tiny_artifact) as m:
        text = "one two three four five " * 4
        plain = m.generate(text, max_new_tokens=60)
        cases = [dict(max_new_tokens=n) for n in (1, 2, 7, 33, 60)]
        if len(plain.text) > 12:
            cases.append(dict(max_new_tokens=60, stop=[plain.text[6:9]]))
        for kw in cases:
            want = m.generate(text, **kw)
            for spec in (Speculation("ngram", k=8, ngram_min=1), Speculation("draft", k=3, draft=m)):
                got = m.generate(text, speculative=spec, **kw)
                assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason), kw


def _exact_joint(m, prompt, cfg, n):
    """{first n tokens: probability} of sampling from m with cfg (top_k bounds the support), by enumeration."""
    from llamaexport.runtime.slots import make_slots

    slots = make_slots(m.backend, 1)
    sampler = Sampler(cfg)
    out = {}

    def walk(prefix, prob):
        slots.truncate(0, len(prompt) + max(len(prefix) - 1, 0))
        logits = slots.prefill(0, prompt if not prefix else [prefix[-1]])
        p = sampler.distribution(logits[None])[0]
        for t in np.flatnonzero(p > 0):
            if len(prefix) + 1 == n:
                out[(*prefix, int(t))] = prob * p[t]
            else:
                walk([*prefix, int(t)], prob * p[t])
                slots.truncate(0, len(prompt) + len(prefix))
    logits = slots.prefill(0, prompt)
    p = sampler.distribution(logits[None])[0]
    for t in np.flatnonzero(p > 0):
        slots.truncate(0, len(prompt))
        if n == 1:
            out[(int(t),)] = p[t]
        else:
            walk([int(t)], p[t])
    slots.close()
    return out


def _chi2_fits(observed, expected, critical_at_df) -> tuple[float, int, float]:
    """(chi-square statistic, degrees of freedom, critical value at p = 0.0005); cells expected < 5 pooled."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    small = expected < 5
    chi2 = (((observed[~small] - expected[~small]) ** 2) / expected[~small]).sum()
    if small.any():
        chi2 += (observed[small].sum() - expected[small].sum()) ** 2 / expected[small].sum()
    df = int((~small).sum() + small.any()) - 1
    return chi2, df, critical_at_df[df]


CHI2_0005 = {1: 12.1, 2: 15.2, 3: 17.7, 4: 20.0, 5: 22.1, 6: 24.1, 7: 26.0, 8: 27.9, 9: 29.7, 10: 31.4, 11: 33.1,
             12: 34.8, 13: 36.5, 14: 38.1, 15: 39.7, 16: 41.3, 17: 42.9, 18: 44.4, 19: 45.9, 20: 47.5, 21: 49.0,
             22: 50.5, 23: 52.0, 24: 53.5, 25: 55.0, 26: 56.4}


def test_pick_accepts_with_p_over_q_and_draws_the_residual():
    """pick() over a sampled draft: whatever q the draft came from, the kept token is distributed as the target's
    p (temperature 0.7, top-p 0.9 on 8 ids): 20,000 draws, chi-square against p."""
    from llamaexport.runtime.speculative import pick

    rng = np.random.default_rng(0)
    logits = rng.normal(size=8).astype(np.float32) * 2
    sampler = Sampler(SamplingConfig(temperature=0.7, top_p=0.9, seed=1))
    p = sampler.distribution(logits[None])[0]
    for q in (np.full(8, 1 / 8), np.roll(p, 1), p[::-1].copy()):
        q = q / q.sum()
        counts = np.zeros(8)
        for _ in range(20000):
            d = int(rng.choice(8, p=q))
            counts[pick(sampler, logits, None, None, None, d, q)] += 1
        support = p > 0
        chi2, df, critical = _chi2_fits(counts[support], 20000 * p[support], CHI2_0005)
        assert chi2 < critical and counts[~support].sum() == 0, (q, chi2, df)


def test_a_sampled_draft_cut_by_the_grammar_still_draws_the_residual():
    """fit_to_grammar keeps the drafts the grammar accepts; a sampled draft cut there leaves its first refused
    draft and q for the next position, where pick() rejects it (p = 0 there) and draws max(0, p - q): the
    kept token is still distributed as p (plain sampling from p there would skew it towards what q avoided)."""
    from llamaexport.runtime.speculative import fit_to_grammar, pick, position

    class CutAfterOne:
        def valid_prefix(self, drafts):
            return 1
    q = [np.full(4, 0.25)] * 3
    drafts, qs, tail = fit_to_grammar(CutAfterOne(), [3, 2, 1], q)
    assert drafts == [3] and len(qs) == 1 and tail[0] == 2
    assert position(drafts, qs, tail, 0) == (3, q[0]) and position(drafts, qs, tail, 1) == (2, q[1])
    assert fit_to_grammar(CutAfterOne(), [3, 2], None) == ([3], None, None)  # a deterministic draft: no tail
    assert position([3], None, None, 1) == (None, None)
    # at the tail's position the grammar refuses id 2 (p = 0), which q favours
    logits = np.log(np.array([0.5, 0.5, 1e-30, 1e-30], np.float32))
    sampler = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=3))
    qd = np.array([0.1, 0.0, 0.9, 0.0])
    counts = np.zeros(4)
    rng = np.random.default_rng(1)
    for _ in range(4000):
        counts[pick(sampler, logits, None, None, None, int(rng.choice(4, p=qd)), qd)] += 1
    chi2, df, critical = _chi2_fits(counts[:2], [2000, 2000], CHI2_0005)
    assert counts[2:].sum() == 0 and chi2 < critical, counts


def test_engine_refuses_a_speculation_it_cannot_run(tiny_artifact, tiny_draft):
    from llamaexport.runtime.completion import BadArgument

    with LlamaModel.load(tiny_artifact) as m:
        engine = Engine(m, max_batch=1)
        try:
            with pytest.raises(BadArgument, match="Speculation or None"):
                engine.submit([5, 6, 7], max_new_tokens=4, speculative="ngram")
            with pytest.raises(BadArgument, match="engine's own"):
                engine.submit([5, 6, 7], max_new_tokens=4, speculative=Speculation("draft", draft=str(tiny_draft)))
        finally:
            engine.close()
    default = Speculation("ngram", k=6, ngram=4, ngram_min=2)
    assert Speculation.parse({"ngram": 3}, default=default) == Speculation("ngram", 6, 3, 2)  # the rest: the server's
    assert Speculation.parse(None, default=default) is default and Speculation.parse(False, default=default) is None


def test_sampling_keeps_the_models_distribution(tiny_artifact, tiny_draft):
    """temperature 1, top-k 3: the first three tokens of 1,500 sampled generations per proposer (a sampled draft
    from another model, whose top 3 the target refuses: every draft rejected, each token from the residual;
    prompt lookup: accepted and refused) fit the exact joint distribution (chi-square, 27 cells, p = 0.0005)."""
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    with LlamaModel.load(tiny_artifact) as m, LlamaModel.load(tiny_draft) as other:
        # the text repeats the model's own greedy continuation of [5, 6, 7]: prompt lookup proposes it again
        prompt = [5, 6, 7, *m.generate_ids([[5, 6, 7]], max_new_tokens=6, eos_ids=[])[0], 5, 6, 7]
        exact = _exact_joint(m, prompt, cfg, 3)
        assert abs(sum(exact.values()) - 1) < 1e-4 and len(exact) == 27
        keys = sorted(exact)
        for spec in (Speculation("draft", k=3, draft=other), Speculation("ngram", k=4, ngram_min=1)):
            counts = dict.fromkeys(keys, 0)
            stats = SpecStats()
            N = 1500
            for seed in range(N):
                s = SamplingConfig(temperature=1.0, top_k=3, seed=seed)
                toks = [int(t[0]) for t in m.steps([prompt], max_new_tokens=4, sampling=s, eos_ids=[],
                                                   speculative=spec, spec_stats=stats)]
                counts[tuple(toks[:3])] += 1
            chi2, df, critical = _chi2_fits([counts[k] for k in keys], [exact[k] * N for k in keys], CHI2_0005)
            assert chi2 < critical, (spec.method, chi2, df)
            assert stats.drafted > 0 and stats.accepted < stats.drafted, stats  # drafts were checked, some refused
            if spec.method == "ngram":
                assert stats.accepted > 0, stats


def test_engine_speculates_for_a_lone_stream_and_batches_as_usual(tiny_artifact):
    """The engine with speculation on by default: requests alone and requests decoding together give plain
    decoding's greedy tokens (with logprobs equal to plain's, and under a grammar), and only the lone ones
    ran speculative steps."""
    with LlamaModel.load(tiny_artifact) as m:
        prompts = _prompts(m.config.vocab_size, n=6, seed=3)
        want = [m.generate_ids([p], max_new_tokens=24, eos_ids=[])[0] for p in prompts]
        engine = Engine(m, max_batch=3, speculative=Speculation("ngram", k=4, ngram_min=1))
        try:
            for p, w in zip(prompts, want):
                evs = list(engine.stream(p, max_new_tokens=24, eos_ids=[], logprobs=2))
                ids = [e.token_id for e in evs if not isinstance(e, DoneEvent) and e.token_id >= 0]
                assert ids == w
                done = evs[-1]
                plain = list(engine.stream(p, max_new_tokens=24, eos_ids=[], logprobs=2, speculative=None))[-1]
                # a several-token forward rounds differently from one-token ones: equal within float noise
                assert [lp.token_id for lp in done.logprobs] == [lp.token_id for lp in plain.logprobs] == w
                np.testing.assert_allclose([lp.logprob for lp in done.logprobs], [lp.logprob for lp in plain.logprobs],
                                           atol=1e-3)
                assert [len(lp.top) for lp in done.logprobs] == [2] * len(w)
            lone = engine.executor.spec_stats.forwards
            assert lone > 0 and engine.executor.spec_stats.accepted > 0
            boxes = {}
            for i, p in enumerate(prompts[:3]):  # together: batched decode steps
                boxes[i] = []
                engine.submit(p, max_new_tokens=24, eos_ids=[], on_event=boxes[i].append)
            while engine.scheduler.has_work:
                engine.step()
            for i in boxes:
                assert [e.token_id for e in boxes[i] if not isinstance(e, DoneEvent) and e.token_id >= 0] == want[i]
            grammar = m.constraint({"type": "regex", "regex": "(ab|cd)+ [0-9]{3}"}).grammar
            spec_done = list(engine.stream(prompts[0], max_new_tokens=20, grammar=grammar))[-1]
            plain_done = list(engine.stream(prompts[0], max_new_tokens=20, grammar=grammar, speculative=None))[-1]
            assert spec_done.text == plain_done.text and spec_done.finish_reason == plain_done.finish_reason
        finally:
            engine.close()


def test_run_and_bench_with_speculation(tiny_artifact, tiny_draft, tmp_path):
    plain = run_cli("run", tiny_artifact, "--prompt", "a b c a b c a b", "--max-new-tokens", "20")
    assert plain.returncode == 0, plain.stderr
    for extra in (["--speculative", "ngram"], ["--draft", tiny_draft], ["--speculative", "draft", "--draft",
                                                                        tiny_artifact, "--spec-k", "2"]):
        r = run_cli("run", tiny_artifact, "--prompt", "a b c a b c a b", "--max-new-tokens", "20", *extra)
        assert r.returncode == 0 and r.stdout == plain.stdout, (extra, r.stderr)
    text = tmp_path / "p.txt"
    text.write_text("one two three one two three one two")
    r = run_cli("bench", tiny_artifact, "--prompt-file", text, "--new-tokens", "16", "--repeat", "1",
                "--speculative", "ngram", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert b["speculative"] == "ngram" and b["forwards"] > 0 and b["tokens_per_forward"] >= 1 and b["prompt_len"] > 8


def test_bad_speculation_options_are_one_clear_error(tiny_artifact, tmp_path):
    from llamaexport.build.pipeline import build

    alien = build(out=tmp_path / "alien", size="tiny", seed=7, progress=False)  # no tokenizer
    for args, *fragments in ((["--speculative", "draft"], "needs a draft artifact", "--draft"),
                             (["--speculative", "ngram", "--spec-k", "0"], "speculative k"),
                             (["--spec-k", "3"], "--spec-k needs --speculative"),
                             (["--speculative", "ngram", "--draft", tiny_artifact], "--draft goes with"),
                             (["--draft", alien], "another tokenizer", "same family")):
        r = run_cli("run", tiny_artifact, "--prompt", "hi", "--max-new-tokens", "4", *map(str, args))
        assert_clean_error(r, *fragments)
    r = run_cli("bench", tiny_artifact, "--batch", "2", "--speculative", "ngram", "--repeat", "1")
    assert_clean_error(r, "--batch 1")


def test_server_requests_choose_speculation(tiny_artifact):
    """A request's "speculative" field: "ngram" or an object gives plain decoding's text; false turns it off;
    a bad value or a draft the server was not started with is a 400 naming the field."""
    from test_serve import asgi

    from llamaexport.serving.server import create_app

    with LlamaModel.load(tiny_artifact) as m:
        engine = Engine(m, max_batch=2)
        engine.start()
        try:
            app = create_app(engine, model_name="tiny", chat_format="chatml")
            body = {"prompt": "a b c a b c a b c", "max_tokens": 24, "temperature": 0}
            plain = asgi(app, "POST", "/v1/completions", json=body).json()["choices"][0]["text"]
            for spec in ("ngram", {"method": "ngram", "k": 3, "ngram": 2, "ngram_min": 1}, True, False):
                r = asgi(app, "POST", "/v1/completions", json={**body, "speculative": spec})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain, (spec, r.text)
            assert engine.executor.spec_stats.forwards > 0
            for spec, fragment in (("eagle", "method must be one of"), ({"k": 0}, "speculative k"),
                                   ({"depth": 3}, "not 'depth'"), ("draft", "--draft DIR"), (3, "must be true")):
                r = asgi(app, "POST", "/v1/completions", json={**body, "speculative": spec})
                err = r.json()["error"]
                assert r.status_code == 400 and err["param"] == "speculative" and fragment in err["message"], err
        finally:
            engine.close()

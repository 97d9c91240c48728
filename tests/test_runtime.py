"""Generation tier: the torch-free runtime against the reference, batching, sampling, stopping."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from llamaexport import LlamaExportError
from llamaexport.model.checkpoint import load_checkpoint
from llamaexport.model.kv_form import KVForm
from llamaexport.model.reference import build_reference
from llamaexport.runtime.llama_model import LlamaModel
from llamaexport.runtime.sampling import Sampler, SamplingConfig


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return LlamaModel.load(tiny_artifact, threads=1)


@pytest.fixture(scope="module")
def reference():
    ck = load_checkpoint(size="tiny", seed=7)
    return build_reference(ck.config, ck.weights)


PROMPTS = [[5, 17, 99, 3, 250], [400, 2], [7, 7, 7, 8, 9, 10, 11, 12, 13]]


def _greedy_without_cache(reference, prompt, n):
    """The oracle: each next token from one full forward over everything so far (no KV cache)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            t = torch.tensor([ids])
            logits, _ = reference(t, torch.ones_like(t), torch.arange(len(ids))[None], reference.empty_cache(1))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_tokens_equal_reference(model, reference):
    for p in PROMPTS:
        got = model.generate_ids([p], max_new_tokens=24, eos_ids=[])[0]
        assert got == _greedy_without_cache(reference, p, 24)


def test_left_padded_batch_equals_single_runs(model):
    batch = model.generate_ids(PROMPTS, max_new_tokens=16, eos_ids=[])
    for p, row in zip(PROMPTS, batch):
        assert row == model.generate_ids([p], max_new_tokens=16, eos_ids=[])[0]


def test_eos_stops_each_row(model):
    free = model.generate_ids([PROMPTS[0]], max_new_tokens=12, eos_ids=[])[0]
    eos = free[4]
    got = model.generate_ids([PROMPTS[0]], max_new_tokens=12, eos_ids=[eos])[0]
    assert got == free[: free.index(eos) + 1]


def test_sampling_is_seeded_and_filters_like_hf(model):
    def run(**kw):
        return model.generate_ids([PROMPTS[1]], max_new_tokens=20, eos_ids=[], sampling=SamplingConfig(**kw))[0]

    g = run()
    assert run(temperature=1.0, top_k=1, seed=1) == g          # top-k 1 is greedy
    assert run(temperature=1.0, top_p=1e-6, seed=2) == g       # top-p tiny is greedy
    a, b = run(temperature=1.5, seed=3), run(temperature=1.5, seed=3)
    assert a == b and a != run(temperature=1.5, seed=4)


def test_sampler_distribution_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 50)).astype(np.float32)
    seen = [np.array([1, 2, 3, 3]), np.array([10, 20])]
    cfg = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=0)
    p = Sampler(cfg).distribution(logits, seen)
    ids = torch.tensor([[1, 2, 3, 3], [10, 20, 20, 20]])
    x = torch.tensor(logits)
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8)):
        x = proc(ids, x)
    np.testing.assert_allclose(p, torch.softmax(x, -1).numpy(), atol=1e-6)
    greedy_pen = Sampler(SamplingConfig(repetition_penalty=1.3)).__call__(logits, seen)
    assert (greedy_pen == RepetitionPenaltyLogitsProcessor(1.3)(ids, torch.tensor(logits)).argmax(-1).numpy()).all()


def test_sampling_config_errors():
    with pytest.raises(LlamaExportError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(LlamaExportError, match="temperature"):
        SamplingConfig(temperature=-1)


def _raw_log_softmax(model, ids) -> np.ndarray:
    """The reference: log_softmax of the logits one forward of the model's backend gives at every position of
    `ids` [S] (a fresh cache, every position's logits): [S, V]."""
    logits, _ = model.backend.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                                      model.backend.empty_cache(1))
    return torch.log_softmax(torch.from_numpy(logits[0]).double(), -1).numpy()


def test_generate_reports_the_raw_logprobs(model):
    """Generation.logprobs: each token's log-softmax under the model's own logits at its position, and the
    k most likely ids, most likely first (greedy: the chosen one first). Raw: temperature, penalties and a
    logit bias change what is sampled, never the logprobs reported for it."""
    prompt = model.encode("the quick brown")
    for sampling in (None, SamplingConfig(temperature=1.3, seed=5, repetition_penalty=1.2, logit_bias={7: 3.0, 9: -50})):
        g = model.generate("the quick brown", max_new_tokens=10, sampling=sampling, logprobs=5)
        ids = prompt + g.token_ids
        ref = _raw_log_softmax(model, ids)
        kept = [t for t in g.token_ids if t not in model.tokenizer.eos_ids]  # an EOS id is not reported
        assert [lp.token_id for lp in g.logprobs] == kept and len(kept) >= 9
        for j, lp in enumerate(g.logprobs):
            row = ref[len(prompt) - 1 + j]  # the logits before token j
            assert lp.logprob == pytest.approx(row[lp.token_id], abs=1e-4)
            assert [i for i, _ in lp.top] == np.argsort(-row, kind="stable")[:5].tolist()
            np.testing.assert_allclose([v for _, v in lp.top], row[[i for i, _ in lp.top]], atol=1e-4)
            if sampling is None:
                assert lp.top[0] == (lp.token_id, lp.logprob)
    assert model.generate("the quick brown", max_new_tokens=4).logprobs is None  # not asked: not computed


def test_logit_bias_bans_and_forces_tokens(model):
    """OpenAI's logit bias, added to the logits before anything else, greedy included: -100 bans the greedy
    token, +100 forces one; its ids must be in the model's vocabulary and its values within -100 .. 100."""
    p = PROMPTS[0]
    greedy = model.generate_ids([p], max_new_tokens=6, eos_ids=[])[0]
    banned = model.generate_ids([p], max_new_tokens=6, eos_ids=[], sampling=SamplingConfig(logit_bias={greedy[0]: -100}))[0]
    assert banned[0] != greedy[0] and greedy[0] not in banned
    forced = model.generate_ids([p], max_new_tokens=6, eos_ids=[],
                                sampling=SamplingConfig(temperature=1.0, seed=3, logit_bias={"7": 100}))[0]
    assert forced == [7] * 6
    for bias, message in (({"x": 1}, "logit_bias key 'x' is not a token id"),
                          ({5: 101}, r"logit_bias\['5'\] must be a number from -100 to 100"),
                          ({-1: 1}, "logit_bias key '-1'"), ([1, 2], "logit_bias must be an object")):
        with pytest.raises(LlamaExportError, match=message):
            SamplingConfig(logit_bias=bias)
    with pytest.raises(LlamaExportError, match=r"logit_bias key '512' is not a token id of this model's vocabulary \(0 .. 511\)"):
        model.generate_ids([p], max_new_tokens=2, sampling=SamplingConfig(logit_bias={512: 1}))


def test_text_stream_equals_generate_and_stops_at_stop_string(model):
    pieces = list(model.stream("the quick brown", max_new_tokens=30))
    full = model.generate("the quick brown", max_new_tokens=30)
    assert "".join(pieces) == full.text and len(full.text) >= 6
    assert full.finish_reason == "length" and len(full.token_ids) == 30 or full.finish_reason == "eos"
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut = model.generate("the quick brown", max_new_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert "".join(model.stream("the quick brown", max_new_tokens=30, stop=[stop])) == cut.text


def test_prompt_longer_than_context_is_an_error(model):
    with pytest.raises(LlamaExportError, match="prompt is 300 tokens but the artifact's context is 256"):
        model.generate_ids([[1] * 300], max_new_tokens=4)


def test_one_generation_check_for_the_model_and_the_engine(model):
    """LlamaModel and Engine.submit refuse the same requests with the same messages
    (runtime.check_generation): the engine no longer queues max_new_tokens <= 0 or an empty stop string."""
    from llamaexport.runtime.engine import ContextTooLong, Engine

    engine = Engine(model, max_batch=1, max_queue=1)
    try:
        for kw, message in ((dict(max_new_tokens=0), "max_new_tokens must be a whole number >= 1, got 0"),
                            (dict(max_new_tokens=-2), "max_new_tokens must be a whole number >= 1, got -2"),
                            (dict(max_new_tokens=4, stop=[""]), "stop strings must be a list of non-empty strings")):
            with pytest.raises(LlamaExportError, match=message):
                engine.submit([5, 17], **kw)
            with pytest.raises(LlamaExportError, match=message):
                model.generate_ids([[5, 17]], **kw) if "stop" not in kw else model.generate("hi", **kw)
        for submit in (lambda: engine.submit([1] * 300, max_new_tokens=4),
                       lambda: next(model.steps([[1] * 300], max_new_tokens=4))):
            with pytest.raises(ContextTooLong, match="prompt is 300 tokens but the artifact's context is 256") as e:
                submit()
            assert e.value.param == "prompt"
        with pytest.raises(ContextTooLong, match="ask for at most 254 tokens") as e:
            engine.submit([5, 17], max_new_tokens=255)
        assert e.value.param == "max_tokens"
        with pytest.raises(LlamaExportError, match="empty prompt"):
            engine.submit([], max_new_tokens=4)
        assert engine.counts() == (0, 0)  # nothing was queued
    finally:
        engine.close()


def test_runtime_path_does_not_import_torch(tiny_artifact):
    """Nor the serving stack: the engine is runtime, the HTTP server an optional extra."""
    code = ("import sys; from llamaexport.runtime.llama_model import LlamaModel; m = LlamaModel.load(sys.argv[1]); "
            "print(m.generate('hello world', max_new_tokens=5).finish_reason); "
            "from llamaexport.runtime.engine import Engine; e = Engine(m); print(len(list(e.stream([5, 6], max_new_tokens=3)))); "
            "import llamaexport.cli; "
            "bad = [n for n in ('torch', 'onnx', 'starlette', 'uvicorn', 'sse_starlette', 'prometheus_client') "
            "if n in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_artifact)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cpu_graph_computes_only_the_last_logits_when_asked(tiny_artifact):
    """num_logits_to_keep (optional input, default 0 = all): 1 gives the last position's logits,
    equal to the last row of the full output; generation asks for it, parity leaves it out."""
    import json

    import onnxruntime as ort

    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["io"]["inputs"]["num_logits_to_keep"]["optional"]
    sess = ort.InferenceSession(str(tiny_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = m["model"]
    ids = np.random.default_rng(0).integers(3, cfg["vocab_size"], (1, 12))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(12)[None]}
    for name in m["io"]["inputs"]:
        if name.startswith("past"):
            feed[name] = np.zeros((1, cfg["n_kv_heads"], 0, cfg["head_dim"]), np.float32)
    full = sess.run(["logits"], feed)[0]
    last = sess.run(["logits"], {**feed, "num_logits_to_keep": np.array(1, np.int64)})[0]
    assert full.shape == (1, 12, cfg["vocab_size"]) and last.shape == (1, 1, cfg["vocab_size"])
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5)


def test_decode_steps_reuse_one_binding_and_return_fresh_logits(model):
    """The shared-cache backend binds the cache once per generation and writes each step's logits
    into a new array: rows kept from earlier steps stay intact (parity keeps them all), a step can
    switch between the last position and every position, and the steps equal one full forward."""
    be, V = model.backend, model.config.vocab_size
    assert be.kv_form is KVForm.INPLACE
    ids = np.array([[5, 17, 99, 3, 250, 400, 2, 7]])
    full, _ = be.forward(ids, np.ones_like(ids), np.arange(8)[None], be.empty_cache(1))
    cache = be.empty_cache(1)
    first, cache = be.forward(ids[:, :5], np.ones((1, 5), np.int64), np.arange(5)[None], cache, last_only=True)
    kept = first.copy()
    rows = [first[0, -1]]
    for j in range(5, 7):
        step, cache = be.forward(ids[:, j:j + 1], np.ones((1, j + 1), np.int64), np.array([[j]]), cache)
        rows.append(step[0, -1])
    both, cache = be.forward(ids[:, 7:8], np.ones((1, 8), np.int64), np.array([[7]]), cache, last_only=False)
    assert first.shape == (1, 1, V) and both.shape == (1, 1, V)
    np.testing.assert_array_equal(first, kept)  # not overwritten by the later steps
    np.testing.assert_allclose(np.stack(rows + [both[0, -1]]), full[0, 4:], atol=1e-4)
    # a new cache gets its own binding: every position again
    again, _ = be.forward(ids, np.ones_like(ids), np.arange(8)[None], be.empty_cache(1))
    np.testing.assert_allclose(again, full, atol=1e-5)


def test_a_generation_reuses_the_previous_ones_cache_without_its_stale_entries(tiny_artifact, model):
    """steps() takes a finished generation's KV buffers back (no new maps, no page faults); what a
    longer earlier generation left past the new sequence must not leak in: the tokens equal those
    of a freshly loaded model's first generation. Two generations at once get two caches."""
    fresh = LlamaModel.load(tiny_artifact, threads=1)
    short = [[400, 2]]
    want = fresh.generate_ids(short, max_new_tokens=12, eos_ids=[])
    be = model.backend
    model.generate_ids([[7, 7, 7, 8, 9, 10, 11, 12, 13] * 3], max_new_tokens=30, eos_ids=[])
    batch, spare = be._spare
    assert batch == 1 and np.abs(spare[0].numpy()[0, :, 30:50]).sum() > 0  # the long generation's entries are there
    assert model.generate_ids(short, max_new_tokens=12, eos_ids=[]) == want
    assert be._spare[1] is spare  # the same buffers went round again
    model.generate_ids([[400, 2], [5, 17]], max_new_tokens=4, eos_ids=[])  # batch 2: its cache replaces the spare
    assert be._spare[0] == 2 and be._spare[1] is not spare
    other = [[5, 17, 99, 3, 250]]
    want_other = fresh.generate_ids(other, max_new_tokens=12, eos_ids=[])
    a = model.steps(short, max_new_tokens=12, eos_ids=[])
    b = model.steps(other, max_new_tokens=12, eos_ids=[])
    got = [(int(x[0]), int(y[0])) for x, y in zip(a, b)]  # interleaved: b must not write a's cache
    assert [x for x, _ in got] == want[0] and [y for _, y in got] == want_other[0]


def test_kv_buffers_are_zero_pages_until_written():
    """Max-length KV buffers come from anonymous maps: zero, writable, and resident only where
    written, so repeated generations do not grow the process (glibc's heap would zero them in full)."""
    import resource

    from llamaexport.runtime.llama_model import _lazy_zeros

    a = _lazy_zeros((1, 4, 8192, 256), np.float32)  # 32 MiB
    assert a.shape == (1, 4, 8192, 256) and a.dtype == np.float32 and a.flags.writeable and not a.any()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bufs = [_lazy_zeros((1, 4, 8192, 256), np.float32) for _ in range(8)]  # 256 MiB mapped, none written
    assert not any(b.any() for b in bufs)  # reading untouched pages maps nothing
    for b in bufs:
        b[0, :, :4] = 1.0  # the first positions only, as a short generation writes them
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: far below 256 MiB
    assert bufs[0][0, 0, :4].all() and not bufs[0][0, 0, 4:].any()


def test_the_profiles_threads_reach_the_runtime(tmp_path):
    """A profile's [runtime] threads is recorded at build and used when --threads is not given."""
    from pathlib import Path

    from llamaexport.build.pipeline import build

    cpu = (Path(__file__).parents[1] / "llamaexport/data/profiles/cpu.toml").read_text()
    prof = tmp_path / "one-thread.toml"
    prof.write_text(cpu.replace('name = "cpu"', 'name = "one-thread"').replace("threads = 0 ", "threads = 1 "))
    out = build(out=tmp_path / "a", size="tiny", profile=str(prof), progress=False)
    with LlamaModel.load(out) as m:
        assert m.manifest["runtime"] == {"threads": 1} and m.backend.threads == 1
    with LlamaModel.load(out, threads=2) as m:
        assert m.backend.threads == 2


def test_check_drives_the_runtime_decode_loop(tiny_artifact, monkeypatch):
    """check's artifact logits come from LlamaModel.steps (what run uses): the prefill over the whole
    prompt, then single-token decode steps asking for the last position only, on the recycled cache."""
    from llamaexport.runtime.llama_model import OnnxRuntimeBackend
    from llamaexport.verify.parity import check

    calls = []
    real = OnnxRuntimeBackend.forward

    def spy(self, input_ids, attention_mask, position_ids, cache, last_only=False):
        calls.append((np.shape(input_ids)[1], last_only))
        return real(self, input_ids, attention_mask, position_ids, cache, last_only)

    monkeypatch.setattr(OnnxRuntimeBackend, "forward", spy)
    r = check(tiny_artifact, n_tokens=6, progress=False, write=False)
    assert r["passed"] and r["greedy_identical"]
    decode = [c for c in calls if c[0] == 1]
    assert decode and all(last_only for _, last_only in decode)
    assert sum(1 for c in calls if c[0] > 1 and not c[1]) >= r["prompts"]  # each prompt's full prefill


def test_onnxruntime_device_picks_the_cuda_provider_only_where_there_is_one(monkeypatch, capsys):
    """runtime.device cuda (an onnxruntime profile's [runtime] device) asks for ONNX Runtime's CUDA
    provider; an onnxruntime without it (the CPU package) runs on the CPU after one warning; device cpu
    never takes the GPU."""
    from llamaexport.runtime import llama_model as runtime

    monkeypatch.setattr(runtime, "_warned_cuda", False)
    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.providers_for("cuda", both) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.providers_for("cpu", both) == ["CPUExecutionProvider"]
    assert capsys.readouterr().err == ""
    for _ in range(2):
        assert runtime.providers_for("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    err = capsys.readouterr().err
    assert err.count("warning: this artifact is for ONNX Runtime's CUDA provider") == 1 and "onnxruntime-gpu" in err


def test_an_onnxruntime_gpu_artifact_records_its_device_and_runs_where_it_can(tmp_path, reference):
    """An onnxruntime profile with [runtime] device cuda builds the portable graph (standard ops, all of
    which the CUDA provider runs) and records device cuda; the runtime takes the CUDA provider where this
    onnxruntime has it, else the CPU, and either way generates the reference's greedy tokens."""
    import onnxruntime as ort

    from llamaexport.build.pipeline import build

    prof = tmp_path / "ort-gpu.toml"
    prof.write_text('name = "ort-gpu"\nbackend = "onnxruntime"\nmemory_gb = 8.0\nmemory_bandwidth_gbs = 500.0\n'
                    'precisions = ["fp32", "fp16"]\ndefault_context = 64\n\n[runtime]\ndevice = "cuda"\n')
    out = build(out=tmp_path / "a", size="tiny", seed=7, profile=str(prof), progress=False)
    with LlamaModel.load(out) as m:
        assert m.manifest["runtime"]["device"] == "cuda" and m.manifest["export_target"] == "portable"
        assert m.manifest["graph"]["kv_update"] == "Concat"
        have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        assert m.backend.device == ("cuda" if have_cuda else "cpu")
        assert m.generate_ids([PROMPTS[0]], max_new_tokens=12, eos_ids=[])[0] == \
            _greedy_without_cache(reference, PROMPTS[0], 12)

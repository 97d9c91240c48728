"""TensorRT tier: engine build, the TensorRT runtime backend, profile switching, `llamaexport compile`.

Without TensorRT or a CUDA GPU the tests of the TensorRT graph that ONNX Runtime can run do run: both
KV-cache forms (concat for TensorRT < 10.15, in place for >= 10.15) built --export-only, checked
against the reference, served by the engine, and their optimization profiles; the rest skip with the
reason. The GPU tests build the `tiny` model in fp16, in each form the installed TensorRT takes, for a
profile describing this machine's GPU (batch 2, so left-padded batches are covered) and compare with
the eager reference (`llamaexport.verify.parity`) and with ONNX Runtime on the same model.onnx.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamaexport import LlamaExportError
from llamaexport.model.kv_form import KVForm

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llamaexport.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=1200, env={**os.environ, **(env or {})})


def one_error_line(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


# ------------------------------------------------------------------------------------------ CLI, no GPU needed
@pytest.fixture(scope="module")
def export_only_artifact(tmp_path_factory):
    from llamaexport.build.pipeline import build

    d = tmp_path_factory.mktemp("export-only")
    return build(out=d / "art", size="tiny", seed=7, profile="rtx4090", export_only=True, progress=False)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the GPU tests below compile for real")
def test_compile_without_tensorrt_is_one_clear_line(export_only_artifact):
    before = (export_only_artifact / "manifest.json").read_text()
    assert json.loads(before)["engine"] is None
    line = one_error_line(cli("compile", export_only_artifact))
    assert "needs TensorRT" in line and "pip install tensorrt" in line, line
    assert (export_only_artifact / "manifest.json").read_text() == before
    assert not (export_only_artifact / "engine.plan").exists()
    assert not list(export_only_artifact.glob(".engine.plan.*.tmp"))


def test_compile_refuses_what_it_cannot_compile(tiny_artifact, tmp_path):
    assert "is an onnxruntime artifact" in one_error_line(cli("compile", tiny_artifact))
    assert "not a llamaexport artifact" in one_error_line(cli("compile", tmp_path / "none"))


def test_tensorrt_messages_say_what_failed_and_which_version():
    """Without TensorRT: the lines the build prints when the parser fails or makes no plugin layer."""
    from llamaexport.tensorrt.builder import no_plugin_layers, parse_failure

    assert no_plugin_layers("10.3.0.26", "/p/lib.so", {"RoPE": True, "SwiGLU": True}, None) == (
        "note: TensorRT 10.3.0.26 expands the RoPE/SwiGLU function bodies instead of the plugins (its ONNX parser "
        "prefers a node's local function to a plugin before 10.7)")
    assert no_plugin_layers("10.16.0", "/p/lib.so", {"RoPE": False, "SwiGLU": True}, "W") == (
        "warning: TensorRT 10.16.0 made no plugin layers although /p/lib.so is loaded: the creator RoPE (namespace "
        "llamaexport, version 1) is not registered; last TensorRT warning: W; the engine runs the RoPE/SwiGLU "
        "function bodies instead")
    assert "its RoPE and SwiGLU creators are registered; the engine" in no_plugin_layers(
        "11.1.0", "/p/lib.so", {"RoPE": True, "SwiGLU": True}, None)
    errors = ["Scale coefficients must all be positive at node 7 '/q/DequantizeLinear' (DequantizeLinear)", "b", "c"]
    line = parse_failure("10.16.0", "/a/model.onnx", errors, None)
    assert line.startswith("TensorRT 10.16.0 cannot parse /a/model.onnx: Scale coefficients must all be positive at "
                           "node 7 '/q/DequantizeLinear' (DequantizeLinear) | b (and 1 more); ")
    assert parse_failure("11.1.0", "/a/model.onnx", [], "E").startswith(
        "TensorRT 11.1.0 cannot parse /a/model.onnx (TensorRT said: E); ")


def test_export_only_artifact_passes_check_with_onnxruntime(export_only_artifact):
    """rtx4090's target TensorRT (its profile's tensorrt_version 10.15) gets the in-place graph; `check`
    runs it with ONNX Runtime, fp16 as TensorRT would, within the fp16 budget."""
    m = json.loads((export_only_artifact / "manifest.json").read_text())
    assert m["kv_cache"]["form"] == "past_present_shared" and m["graph"]["kv_update"] == "TensorScatter"
    r = cli("check", export_only_artifact, "--backend", "onnxruntime", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["backend"] == "onnxruntime" and report["precision"] == "fp16"


@pytest.fixture(scope="module")
def graph_forms(tmp_path_factory):
    """{form: artifact}: the TensorRT graph of `tiny` in both KV-cache forms, --export-only, fp32 (so ONNX
    Runtime's run is exact against the reference), with a tokenizer (the serving engine needs one)."""
    from conftest import train_tiny_spm

    from llamaexport.build.pipeline import build

    d = tmp_path_factory.mktemp("forms")
    prof = d / "gpu.toml"
    prof.write_text('name = "gpu"\nbackend = "tensorrt"\nmemory_gb = 8.0\nmemory_bandwidth_gbs = 500.0\n'
                    'tensorrt_version = "10.3"\nprecisions = ["fp32", "fp16"]\ndefault_context = 128\n'
                    'default_batch = 2\n')
    tok = train_tiny_spm(d)
    return {kv: build(out=d / kv, size="tiny", seed=7, profile=str(prof), tokenizer=str(tok), export_only=True,
                      precision="fp32", progress=False, **({} if kv == "concat" else {"kv_cache": "inplace"}))
            for kv in ("concat", "inplace")}


def test_each_form_meets_the_fp32_budget_through_onnxruntime(graph_forms):
    """The profile's TensorRT 10.3 gets the concat graph by default, --kv-cache inplace the other; each
    records its form and the TensorRT it needs, and passes `check` (greedy tokens identical, logits
    within 1e-4 of the reference) through the runtime's own loop: in place, the cache is one max-length
    buffer bound as past and present."""
    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.verify.parity import check

    for kv, form, need in (("concat", "past_present", "10.0"), ("inplace", "past_present_shared", "10.15")):
        m = json.loads((graph_forms[kv] / "manifest.json").read_text())
        assert (m["kv_cache"]["form"], m["graph"]["min_tensorrt"], m["left_padding"]) == (form, need, True)
        assert not m["io"]["inputs"]["num_logits_to_keep"].get("optional")
        r = check(graph_forms[kv], n_tokens=12, progress=False, write=False, backend="onnxruntime")
        assert r["passed"] and r["greedy_identical"] and r["max_abs_logit"] < 1e-4, (kv, r["failures"])
    with LlamaModel.load(graph_forms["inplace"], backend="onnxruntime") as model:
        be = model.backend
        assert be.kv_form is KVForm.INPLACE and be.empty_cache(2)[0].shape()[2] == model.config.max_seq_len


def test_serving_engine_on_each_form(graph_forms):
    """The engine serves the in-place graph with InplaceSlots (rows of their own lengths in one buffer,
    written where each row ends: no padding, no copies) and the concat graph with ConcatSlots; either
    way each request gets what it gets alone, and a left-padded batch through `steps` too; n choices copy
    the prompt's cache, and an echo's prompt logprobs are the model's."""
    from llamaexport.runtime.engine import DoneEvent, Engine, TextEvent
    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.runtime.slots import ConcatSlots, InplaceSlots

    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 400, n).tolist() for n in (9, 4, 13)]
    for kv, kind in (("inplace", InplaceSlots), ("concat", ConcatSlots)):
        with LlamaModel.load(graph_forms[kv], backend="onnxruntime") as model:
            alone = [model.generate_ids([p], max_new_tokens=10, eos_ids=[])[0] for p in prompts]
            assert model.generate_ids(prompts, max_new_tokens=10, eos_ids=[]) == alone  # left-padded together
            engine = Engine(model, max_batch=2, prefill_chunk=5)
            assert isinstance(engine.slots, kind)
            got, done = {i: [] for i in range(3)}, set()
            for i, p in enumerate(prompts):
                def on_event(ev, i=i, got=got, done=done):
                    if isinstance(ev, DoneEvent):
                        done.add(i)
                    elif isinstance(ev, TextEvent) and ev.token_id >= 0:
                        got[i].append(ev.token_id)
                engine.submit(p, max_new_tokens=10, eos_ids=[], on_event=on_event)
            while len(done) < 3:
                engine.step()
            assert [got[i] for i in range(3)] == alone, kv
            # two choices share the prompt's cache (SlotCache.copy_prefix), and the prompt's logprobs come from
            # chunks whose every position's logits are kept: the model's own, as one forward gives them
            ends = [e for e in engine.stream(prompts[2], max_new_tokens=6, eos_ids=[], n=2, logprobs=1,
                                             prompt_logprobs=True) if isinstance(e, DoneEvent)]
            assert [[lp.token_id for lp in e.logprobs] for e in ends] == [alone[2][:6]] * 2, kv
            logits, _ = model.backend.forward(np.array([prompts[2]]), np.ones((1, 13), np.int64), np.arange(13)[None],
                                              model.backend.empty_cache(1))
            x = logits[0] - logits[0].max(1, keepdims=True)
            ref = x - np.log(np.exp(x).sum(1, keepdims=True))  # [13, V]: row j gives the logprobs of id j + 1
            lps = ends[1].prompt_logprobs
            assert lps[0] is None and len(lps) == 13
            np.testing.assert_allclose([lp.logprob for lp in lps[1:]], ref[np.arange(12), prompts[2][1:]], atol=1e-4)
            engine.close()


def test_profiles_of_each_form(graph_forms):
    """The optimization profiles tensorrt.builder gives each form (no TensorRT needed to compute them): in
    place, the past is the static max-length buffer and a prompt chunk on a cache fits the prefill
    profile; num_logits_to_keep is a shape tensor with values 0..L (prefill) and 0..1 (decode)."""
    from llamaexport.tensorrt.builder import profile_shapes

    L = 128
    for kv in ("concat", "inplace"):
        m = json.loads((graph_forms[kv] / "manifest.json").read_text())
        pre, dec = profile_shapes(m, 2)
        assert pre["values"] == {"num_logits_to_keep": ([0], [1], [L])} and dec["values"]["num_logits_to_keep"][2] == [1]
        assert pre["shapes"]["input_ids"] == ((1, 1), (2, 128), (2, L)) and dec["shapes"]["input_ids"][2] == (2, 1)
        past = pre["shapes"]["past_key_values.0.key"]
        if kv == "concat":
            assert [s[2] for s in past] == [0, 0, 0] and [s[2] for s in dec["shapes"]["past_key_values.0.key"]] == [1, 64, L - 1]
            assert dec["shapes"]["attention_mask"] == ((1, 2), (2, 65), (2, L)) and pre["past"] == [0, 0]
        else:
            assert {s[2] for s in past} == {L} and {s[2] for s in dec["shapes"]["past_key_values.0.key"]} == {L}
            assert pre["shapes"]["attention_mask"] == ((1, 1), (2, 128), (2, L)) and pre["past"] == [0, L - 1]
            assert dec["shapes"]["attention_mask"] == ((1, 1), (2, 65), (2, L))


def test_the_inplace_graph_needs_tensorrt_10_15(graph_forms):
    """compile / build on an older TensorRT refuse the in-place graph with the way out (before parsing)."""
    from types import SimpleNamespace

    from llamaexport.tensorrt.builder import require_graph_support

    m = json.loads((graph_forms["inplace"] / "manifest.json").read_text())
    with pytest.raises(LlamaExportError, match=r"needs TensorRT >= 10.15, this is 10.3.0.26; rebuild the artifact with "
                                               r"--kv-cache concat"):
        require_graph_support(SimpleNamespace(__version__="10.3.0.26"), m)
    require_graph_support(SimpleNamespace(__version__="10.15.1.29"), m)
    require_graph_support(SimpleNamespace(__version__="10.3.0.26"),
                          json.loads((graph_forms["concat"] / "manifest.json").read_text()))


# ------------------------------------------------------------------------------------------ GPU + TensorRT
@pytest.fixture(scope="module")
def gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT not installed")
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return trt, torch


def _gpu_profile(d: Path, torch, *, batch: int) -> Path:
    """A profile for this machine's GPU (its memory, a small workspace and a quick build)."""
    props = torch.cuda.get_device_properties(0)
    p = d / "this-gpu.toml"
    p.write_text(f'''name = "this-gpu"
description = "{props.name} (test)"
backend = "tensorrt"
memory_gb = {props.total_memory / 2**30:.1f}
reserved_gb = 1.0
memory_bandwidth_gbs = 1000.0
compute_capability = "{props.major}.{props.minor}"
precisions = ["fp32", "fp16", "int8", "int4"]
default_context = 256
default_batch = {batch}

[builder]
workspace_gb = 1.0
builder_optimization_level = 2
''')
    return p


@pytest.fixture(scope="module", params=["concat", "inplace"])
def trt_setup(gpu, tmp_path_factory, request):
    """(artifact dir, profile path, timing cache path): tiny, fp16, batch <= 2, context 256, in each
    KV-cache form this TensorRT takes (in place: >= 10.15)."""
    from llamaexport.build.pipeline import build
    from llamaexport.build.recipe import INPLACE_MIN_TENSORRT
    from llamaexport.tensorrt.api import version_tuple

    if request.param == "inplace" and version_tuple(gpu[0].__version__) < INPLACE_MIN_TENSORRT:
        pytest.skip(f"TensorRT {gpu[0].__version__} < 10.15 has no KV-cache update layer")
    d = tmp_path_factory.mktemp("trt-" + request.param)
    prof = _gpu_profile(d, gpu[1], batch=2)
    cache = d / "timing.cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMAEXPORT_TIMING_CACHE", str(cache))
        art = build(out=d / "art", size="tiny", seed=7, profile=str(prof), precision="fp16", progress=False,
                    kv_cache=request.param)
    return art, prof, cache


def test_engine_and_manifest(gpu, trt_setup):
    trt = gpu[0]
    art, _, cache = trt_setup
    m = json.loads((art / "manifest.json").read_text())
    eng = m["engine"]
    assert (art / eng["file"]).is_file() and eng["tensorrt"] == trt.__version__
    assert [(p["name"], p["index"]) for p in eng["profiles"]] == [("prefill", 0), ("decode", 1)]
    shared = m["kv_cache"]["form"] == "past_present_shared"
    assert eng["profiles"][1]["past"] == ([0, 255] if shared else [1, 255]) and eng["profiles"][0]["batch"] == [1, 2]
    assert cache.is_file() and eng["timing_cache"] == str(cache)
    assert eng["tf32"] is True  # an fp16 artifact keeps TensorRT's default for its few fp32 ops
    major, minor = (int(x) for x in trt.__version__.split(".")[:2])
    if eng["plugin_library"] and (major, minor) >= (10, 7):
        assert eng["plugin_layers"] == 3 * m["model"]["n_layers"]  # RoPE q, RoPE k, SwiGLU per layer
    else:
        assert eng["plugin_layers"] == 0


def test_parity_against_the_eager_reference(trt_setup):
    from llamaexport.verify.parity import check

    report = check(trt_setup[0], progress=False)
    assert report["backend"] == "tensorrt"
    assert report["passed"], report["failures"]


def _first_divergence_is_a_near_tie(ort_model, prompt, a, b, tol=1e-2) -> bool:
    """Greedy sequences a (TensorRT) and b (ONNX Runtime) differ: is it an fp16 near-tie, i.e. do
    ONNX Runtime's logits at the first differing step rank the two tokens within `tol`?"""
    k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    ids = np.array([prompt + b[:k]])
    be = ort_model.backend
    logits, _ = be.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], be.empty_cache(1))
    return abs(float(logits[0, -1, a[k]] - logits[0, -1, b[k]])) < tol


def test_greedy_tokens_match_onnxruntime_through_both_profiles(trt_setup):
    from llamaexport.runtime.llama_model import LlamaModel

    art = trt_setup[0]
    trt_model = LlamaModel.load(art)
    ort_model = LlamaModel.load(art, backend="onnxruntime")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, n).tolist() for n in (5, 11)]  # batch 2, left-padded
    got = trt_model.generate_ids(prompts, max_new_tokens=24, eos_ids=[])
    assert trt_model.backend.last_profile == "decode"
    want = ort_model.generate_ids(prompts, max_new_tokens=24, eos_ids=[])
    for p, a, b in zip(prompts, got, want):
        assert a == b or _first_divergence_is_a_near_tie(ort_model, p, a, b), (a, b)
    # prefill logits of a fresh prompt after decoding: the prefill context again
    ids = np.array([prompts[1]])
    args = (ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    lt, _ = trt_model.backend.forward(*args, trt_model.backend.empty_cache(1))
    assert trt_model.backend.last_profile == "prefill"
    lo, _ = ort_model.backend.forward(*args, ort_model.backend.empty_cache(1))
    assert lt.shape == lo.shape == (1, ids.shape[1], lo.shape[2]) and lt.dtype == np.float32
    assert np.abs(lt - lo).max() < 1e-2  # fp16 both; each is ~1e-3 from the fp32 reference
    # num_logits_to_keep = 1: the engine computes and copies the last position only
    last, _ = trt_model.backend.forward(*args, trt_model.backend.empty_cache(1), last_only=True)
    assert last.shape == (1, 1, lo.shape[2]) and np.abs(last[0, 0] - lt[0, -1]).max() < 1e-2
    assert trt_model.backend.device_memory_bytes > 0


def test_both_contexts_share_one_activation_region(trt_setup):
    """The prefill and decode contexts run on one region sized for the larger profile (planner.py
    counts it once), not one allocation each."""
    from llamaexport.runtime.llama_model import LlamaModel

    be = LlamaModel.load(trt_setup[0]).backend
    eng = be.engine
    sizes = [eng.get_device_memory_size_for_profile_v2(p["index"]) for p in be.profiles.values()]
    assert be.activation_bytes == eng.device_memory_size_v2 >= max(sizes) > 0
    assert be._activations.numel() == be.activation_bytes and set(be.contexts) == {"prefill", "decode"}
    be.close()
    assert be._activations is None and be.contexts == {}


def test_chunked_prefill_equals_one_prefill(trt_setup):
    from llamaexport.runtime.llama_model import LlamaModel

    be = LlamaModel.load(trt_setup[0]).backend
    ids = np.random.default_rng(4).integers(3, 512, (1, 12))
    pos = np.arange(12)[None]
    full, _ = be.forward(ids, np.ones((1, 12), np.int64), pos, be.empty_cache(1))
    a, cache = be.forward(ids[:, :5], np.ones((1, 5), np.int64), pos[:, :5], be.empty_cache(1))
    b, cache = be.forward(ids[:, 5:], np.ones((1, 12), np.int64), pos[:, 5:], cache)  # 7 tokens on a cache of 5
    assert cache[0].shape[2] == (256 if be.shared else 12) and cache[0].is_cuda
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), full, atol=1e-2, rtol=0)


def test_serving_engine_batches_on_tensorrt(trt_setup):
    """The serving engine over the TensorRT backend (concat: ConcatSlots, per-slot caches on the GPU,
    left-padded into one batch per decode step; in place: InplaceSlots, rows of one buffer; prompt chunks
    on a cache): each request's greedy tokens equal the same prompt alone, or differ first at an fp16
    near-tie."""
    from llamaexport.runtime.engine import DoneEvent, Engine
    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.runtime.slots import ConcatSlots, InplaceSlots

    art = trt_setup[0]
    trt_model = LlamaModel.load(art)
    ort_model = LlamaModel.load(art, backend="onnxruntime")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 400, n).tolist() for n in (5, 11, 7)]
    alone = [trt_model.generate_ids([p], max_new_tokens=16, eos_ids=[])[0] for p in prompts]
    engine = Engine(trt_model, max_batch=2, prefill_chunk=4)
    assert isinstance(engine.slots, InplaceSlots if trt_model.backend.kv_form is KVForm.INPLACE else ConcatSlots)
    got = {i: [] for i in range(len(prompts))}
    done = set()
    for i, p in enumerate(prompts):
        def on_event(ev, i=i):
            if isinstance(ev, DoneEvent):
                done.add(i)
            elif ev.token_id >= 0:
                got[i].append(ev.token_id)
        engine.submit(p, max_new_tokens=16, eos_ids=[], on_event=on_event)
    while len(done) < len(prompts):
        engine.step()
    for i, p in enumerate(prompts):
        assert got[i] == alone[i] or _first_divergence_is_a_near_tie(ort_model, p, got[i], alone[i]), (got[i], alone[i])
    assert engine.steps <= 32  # two rows decoded together: 15 + 15 steps, not 3 x 15
    engine.close()


def test_limits_are_clear_errors(trt_setup):
    from llamaexport.runtime.llama_model import LlamaModel

    be = LlamaModel.load(trt_setup[0]).backend
    ids = np.ones((3, 4), np.int64)
    with pytest.raises(LlamaExportError, match="batch 3 exceeds the engine's maximum 2"):
        be.forward(ids, np.ones_like(ids), np.arange(4)[None].repeat(3, 0), be.empty_cache(3))
    ids = np.ones((1, 257), np.int64)
    with pytest.raises(LlamaExportError, match="do not fit the engine's context 256"):
        be.forward(ids, np.ones_like(ids), np.arange(257)[None], be.empty_cache(1))


def test_compile_an_export_only_artifact(gpu, trt_setup, tmp_path):
    from llamaexport.build.pipeline import build
    from llamaexport.runtime.llama_model import LlamaModel

    built, prof, cache = trt_setup
    form = json.loads((built / "manifest.json").read_text())["graph"]["kv_update"]
    art = build(out=tmp_path / "art", size="tiny", seed=7, profile=str(prof), precision="fp16",
                export_only=True, progress=False, kv_cache="inplace" if form == "TensorScatter" else "concat")
    env = {"LLAMAEXPORT_TIMING_CACHE": str(cache)}
    r = cli("compile", art, "--profile", prof, env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((art / "manifest.json").read_text())
    assert m["engine"]["file"] == "engine.plan" and (art / "engine.plan").is_file()
    assert "already has an engine" in one_error_line(cli("compile", art, "--profile", prof, env=env))
    ids = np.random.default_rng(5).integers(3, 512, (1, 9))
    args = (ids, np.ones_like(ids), np.arange(9)[None])
    a = LlamaModel.load(art).backend
    b = LlamaModel.load(built).backend
    np.testing.assert_allclose(a.forward(*args, a.empty_cache(1))[0], b.forward(*args, b.empty_cache(1))[0],
                               atol=1e-2, rtol=0)


def test_fp32_engine_is_built_without_tf32_and_meets_the_fp32_budget(trt_setup, tmp_path):
    """TF32 is on by default in TensorRT's builder; an fp32 artifact clears it (its parity budget is fp32's)."""
    from llamaexport.build.pipeline import build
    from llamaexport.verify.parity import check

    _, prof, cache = trt_setup
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMAEXPORT_TIMING_CACHE", str(cache))
        art = build(out=tmp_path / "art", size="tiny", seed=7, profile=str(prof), precision="fp32", progress=False)
    assert json.loads((art / "manifest.json").read_text())["engine"]["tf32"] is False
    report = check(art, progress=False)
    assert report["passed"], report["failures"]

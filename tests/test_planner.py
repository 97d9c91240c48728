"""The memory planner: the paper sizes on our profiles, refusals with numbers, build integration."""

import json
from pathlib import Path

import pytest

from llamaexport import LlamaExportError
from llamaexport.build.pipeline import build
from llamaexport.build.planner import GiB, choose, plan, plan_all
from llamaexport.build.profiles import load_profile, profile_names
from llamaexport.build.recipe import Recipe
from llamaexport.model.config import config_for_size


def _plan(size_or_cfg, profile, precision, **kw):
    """planner.plan for a precision (the recipe's request in kw: int4_recipe, block_size)."""
    cfg = config_for_size(size_or_cfg) if isinstance(size_or_cfg, str) else size_or_cfg
    prof = load_profile(profile)
    request = {k: kw.pop(k) for k in ("int4_recipe", "block_size") if k in kw}
    return plan(cfg, prof, Recipe.for_profile(prof, precision, **request), **kw)


def _choose(size_or_cfg, profile, precision, **kw):
    cfg = config_for_size(size_or_cfg) if isinstance(size_or_cfg, str) else size_or_cfg
    prof = load_profile(profile)
    return choose(cfg, prof, Recipe.candidates(prof, precision), **kw)


def test_bundled_profiles_load():
    names = profile_names()
    for n in ("rtx4090", "rtx3090", "jetson-orin-agx-64gb", "jetson-orin-nx-16gb", "jetson-orin-nano-8gb",
              "jetson-thor", "cpu"):
        assert n in names
        p = load_profile(n)
        assert p.budget_bytes > 0 and p.memory_bandwidth_gbs > 0
    orin = load_profile("jetson-orin-agx-64gb")
    assert orin.shared_memory and orin.compute_capability == "8.7" and "fp8" not in orin.precisions


def test_7b_fp16_weights_are_13_5_gb_and_fit_a_4090():
    p = _plan("7B", "rtx4090", "fp16", context=2048)
    assert abs(p.weights / 1e9 - 13.5) < 0.1 and p.fits
    # the decode ceiling is bandwidth / bytes per token
    assert abs(p.decode_ceiling - 1008e9 / p.bytes_per_token) < 1e-6
    assert 60 < p.decode_ceiling < 80


def test_13b_fp16_refused_on_a_4090_with_what_fits():
    with pytest.raises(LlamaExportError) as e:
        _choose("13B", "rtx4090", "fp16", context=2048)
    msg = str(e.value)
    assert "fp16 needs" in msg and "GiB" in msg and "budget is 22.5 GiB" in msg and "int8, int4, w8a8 fit" in msg
    assert _choose("13B", "rtx4090", "auto", context=2048).precision == "int8"


def test_65b_fits_nowhere_on_a_4090_but_on_thor_in_int8():
    with pytest.raises(LlamaExportError, match="does not fit rtx4090 at any supported precision"):
        _choose("65B", "rtx4090", "auto", context=2048)
    assert _choose("65B", "jetson-thor", "auto", context=2048).precision == "int8"


def test_kv_cache_scales_with_context_and_batch():
    cfg = config_for_size("llama2-70B")
    a = _plan(cfg, "jetson-thor", "int4", context=1024, batch=1)
    b = _plan(cfg, "jetson-thor", "int4", context=4096, batch=2)
    assert b.kv_cache == pytest.approx(8 * a.kv_cache)
    assert a.kv_cache == 2 * 80 * 8 * 128 * 1024 * 2  # GQA: 8 KV heads, fp16
    assert [q.precision for q in plan_all(cfg, load_profile("cpu"))] == ["fp32", "int8", "int4"]


def test_activations_are_one_region_the_largest_profile_not_the_sum():
    """The TensorRT runtime gives its prefill and decode contexts one shared activation region
    (tensorrt.backend), so the plan counts the larger profile's peak once: prefill at the full context."""
    from llamaexport.build.planner import activation_bytes, profile_tokens

    cfg, prof = config_for_size("7B"), load_profile("rtx4090")
    recipe = Recipe.for_profile(prof, "fp16")
    p = plan(cfg, prof, recipe, context=2048, batch=2)
    assert profile_tokens(2048) == [(2048, 0, 2048), (1, 2047, 1)]
    prefill = activation_bytes(cfg, recipe, batch=2, seq=2048, past=0, keep=2048)
    decode = activation_bytes(cfg, recipe, batch=2, seq=1, past=2047, keep=1)
    assert p.activations == max(prefill, decode) == prefill and decode < prefill / 100
    assert p.activations < prefill + decode


def test_profile_tokens_are_the_builders_largest_profile_values():
    """TensorRT sizes activation memory for each profile's max values: the planner's (new tokens, cached
    tokens, kept logits rows) are those of tensorrt.builder.profile_shapes, in both cache forms."""
    from llamaexport.build.export import io_spec
    from llamaexport.build.planner import profile_tokens
    from llamaexport.tensorrt.builder import profile_shapes

    cfg, prof = config_for_size("tiny"), load_profile("rtx4090")
    L = cfg.max_seq_len
    for kv in ("concat", "inplace"):
        recipe = Recipe.for_profile(prof, "fp16", kv_cache=kv)
        manifest = {"model": cfg.to_dict(), "io": io_spec(cfg, recipe), **recipe.manifest_fields(cfg)}
        builder = []
        for p in profile_shapes(manifest, 1):
            seq, width, keep = p["shapes"]["input_ids"][2][1], p["shapes"]["attention_mask"][2][1], p["values"]
            rows = keep["num_logits_to_keep"][2][0] or seq  # 0 keeps every row
            builder.append((seq, width, min(rows, seq)))
        assert builder == [(s, p + s, k) for s, p, k in profile_tokens(L)], kv


def test_activation_terms_follow_the_graph():
    """Each term is a tensor of the exported graph at the prefill profile's max (B = 2, S = T = R = 2048):
    fp16 scores (two at once, op by op), the kept logits rows in float32 and, in fp16 graphs, the output
    layer's fp16 result before its Cast; the peak is the logits plus the largest of a layer's attention, its
    MLP and the output layer."""
    from llamaexport.build.planner import activation_bytes, activation_terms

    cfg, prof = config_for_size("7B"), load_profile("rtx4090")
    B, S, V, D, H, F = 2, 2048, cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.ffn_dim
    fp16 = Recipe.for_profile(prof, "fp16")
    fp32 = fp16.with_precision("fp32")  # the portable graph in fp32 (an onnxruntime cuda profile builds it)
    t = activation_terms(cfg, fp16, batch=B, seq=S, past=0, keep=S)
    assert t == {"logits": B * S * V * 4, "cast": B * S * V * 2, "head_in": B * S * D * 2, "residual": B * S * D * 2,
                 "mask": B * cfg.n_rep * S * S * 2, "scores": 2 * B * H * S * S * 2, "mlp": B * S * 4 * F * 2}
    layer = t["residual"] + t["mask"] + t["scores"]  # 7B's attention outweighs its MLP and the output layer
    assert layer > t["residual"] + t["mask"] + t["mlp"] and layer > t["head_in"] + t["cast"]
    assert activation_bytes(cfg, fp16, batch=B, seq=S, past=0, keep=S) == t["logits"] + layer
    # fp32: scores in float32, no Cast copy; decode keeps one row of logits
    t32 = activation_terms(cfg, fp32, batch=B, seq=S, past=0, keep=S)
    assert t32["scores"] == 2 * t["scores"] and t32["cast"] == 0 and t32["logits"] == t["logits"]
    assert activation_terms(cfg, fp16, batch=B, seq=1, past=S - 1, keep=1)["logits"] == B * V * 4
    # grouped-query attention: the concat form's mask is tiled to rep * S rows, the in-place form's is not
    cfg3 = config_for_size("llama3-8B")
    concat = activation_terms(cfg3, fp16, batch=1, seq=S, past=0, keep=S)
    inplace = activation_terms(cfg3, Recipe.for_profile(prof, "fp16", kv_cache="inplace"), batch=1, seq=S, past=0, keep=S)
    assert concat["mask"] == cfg3.n_rep * inplace["mask"] == cfg3.n_rep * S * S * 2
    # the CPU graph's GroupQueryAttention: one float32 probabilities buffer, no mask tensor
    cpu = activation_terms(cfg, Recipe.for_profile(load_profile("cpu"), "int8"), batch=1, seq=S, past=0, keep=S)
    assert cpu["scores"] == H * S * S * 4 and cpu["mask"] == 0 and cpu["cast"] == 0
    # planning.md: 7B fp16 on the rtx4090 at 2048 tokens, batch 1
    one = activation_terms(cfg, fp16, batch=1, seq=S, past=0, keep=S)
    assert _plan("7B", "rtx4090", "fp16", context=2048, batch=1).activations == (
        one["logits"] + one["residual"] + one["mask"] + one["scores"])
    assert round(_plan("7B", "rtx4090", "fp16", context=2048, batch=1).activations / GiB, 2) == 0.77


def test_build_refuses_before_any_work(tmp_path):
    with pytest.raises(LlamaExportError, match="fp16 needs"):
        build(out=tmp_path / "o", size="13B", profile="rtx4090", precision="fp16", export_only=True)
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_memory_override_and_manifest_plan(tmp_path):
    out = build(out=tmp_path / "o", size="tiny", profile="cpu", memory_gb=4, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "fp32" and m["plan"]["budget_gib"] == pytest.approx(2.0)
    assert m["plan"]["total_gib"] * GiB < 2 * GiB


def test_w8a8_is_planned_like_int8_but_never_chosen_by_auto():
    cfg = config_for_size("7B")
    prof = load_profile("rtx4090")
    plans = {p.precision: p for p in plan_all(cfg, prof, context=2048)}
    assert plans["w8a8"].weights == plans["int8"].weights
    # int4 keeps QKV, o_proj and down at 8 bits on the TensorRT graph: between int8 and pure 4-bit
    assert plans["int8"].weights > plans["int4"].weights > 0.5 * plans["int8"].weights
    for name in profile_names():
        for size in ("tiny", "1.1B", "7B", "13B"):
            try:
                assert _choose(size, name, "auto").precision != "w8a8"
            except LlamaExportError as e:
                assert "does not fit" in str(e)


def test_int4_falls_back_to_compact_when_the_8_bit_projections_do_not_fit():
    """13B on the 16 GB cpu profile: int4 with 8-bit QKV/down needs more than the budget, the
    compact recipe (all 4-bit) fits; the plan says which, and the build's manifest records each
    role's precision."""
    p = _choose("13B", "cpu", "int4")
    assert p.precision == "int4" and p.recipe.compact and p.label == "int4 (compact)"
    assert p.recipe.block == 64 and p.recipe.quant_method == "rtn"  # resolved as compact, not accurate's block
    small = _choose("1.1B", "cpu", "int4")
    assert not small.recipe.compact and small.label == "int4"
    assert small.weights == _plan("1.1B", "cpu", "int4").weights


def test_manifest_records_tensor_precisions(tmp_path):
    out = build(out=tmp_path / "a", size="tiny", precision="int4", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tensor_precisions"] == {"qkv_proj": "int8", "o_proj": "int4", "gate_up_proj": "int4", "down_proj": "int8",
                                      "lm_head": "int8", "embedding": "int8"}
    assert m["plan"]["int4_recipe"] == "accurate"


def test_compact_int4_recipe_is_all_4_bit_and_smaller(tmp_path):
    """--int4-recipe compact: every linear and the CPU output layer at 4 bits (the bytes of
    onnxruntime-genai's int4); the planner counts it, the graph has no 8-bit MatMulNBits left."""
    import onnx

    acc, com = _plan("1.1B", "cpu", "int4"), _plan("1.1B", "cpu", "int4", int4_recipe="compact")
    assert com.label == "int4 (compact)" and acc.label == "int4"
    # 4-bit (5.125 bits/weight with the fp32 scale and 4-bit zero point per 32) vs 8-bit (9.25) on QKV, down, lm_head
    assert 0.6 * acc.weights < com.weights < 0.85 * acc.weights
    assert com.bytes_per_token < acc.bytes_per_token
    out = build(out=tmp_path / "c", size="tiny", precision="int4", int4_recipe="compact", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tensor_precisions"].pop("embedding") == "int8"  # an 8-bit lookup table (one row read per token)
    assert set(m["tensor_precisions"].values()) == {"int4"} and m["plan"]["int4_recipe"] == "compact"
    # its default block is 64 (about the bytes of llama.cpp's Q4_0), everywhere, the output layer too
    assert m["block_size"] == 64 and set(m["tensor_blocks"].values()) == {64}
    m32 = json.loads((build(out=tmp_path / "c32", size="tiny", precision="int4", int4_recipe="compact", block_size=32,
                            progress=False) / "manifest.json").read_text())
    assert m32["block_size"] == 32 and set(m32["tensor_blocks"].values()) == {32}
    assert m["plan"]["decode_ceiling_tok_s"] > m32["plan"]["decode_ceiling_tok_s"]  # planned at its own block
    bits = {a.i for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4}
    with pytest.raises(LlamaExportError, match="applies to int4 only"):
        build(out=tmp_path / "d", size="tiny", precision="int8", int4_recipe="compact", progress=False)
    assert not (tmp_path / "d").exists()



@pytest.mark.parametrize("precision,recipe", [("fp32", "accurate"), ("int8", "accurate"), ("int4", "accurate"),
                                              ("int4", "compact")])
def test_planned_weight_bytes_match_the_built_cpu_graph(tmp_path, precision, recipe):
    """The planner's stored bytes (what it fits against memory) are the bytes the export writes:
    8-bit weights without zero points in an int8 model, with them in an int4 model, 4-bit packed."""
    import onnx
    from onnx import numpy_helper

    from llamaexport.build.pipeline import build
    from llamaexport.build.planner import weight_bytes
    from llamaexport.model.config import config_for_size

    out = build(out=tmp_path / "a", size="tiny", precision=precision, int4_recipe=recipe, progress=False)
    m = onnx.load(str(out / "model.onnx"))
    actual = sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)
    planned, _ = weight_bytes(config_for_size("tiny"), Recipe.resolve(precision=precision, target="ort-cpu",
                                                                      int4_recipe=recipe))
    assert abs(planned - actual) <= 0.005 * actual, (planned, actual)  # zero points alone are 1.3-1.9%


def test_workspace_is_planned_as_built(tmp_path):
    """A TensorRT profile without [builder] is planned with the workspace the engine build uses."""
    from llamaexport.build.profiles import DEFAULT_WORKSPACE_GB

    rtx = (Path(__file__).parents[1] / "llamaexport/data/profiles/rtx4090.toml").read_text()
    p = tmp_path / "bare.toml"
    p.write_text(rtx.split("[builder]")[0])
    bare = load_profile(str(p))
    assert bare.builder == {} and bare.workspace_gb == DEFAULT_WORKSPACE_GB
    assert _plan("7B", str(p), "fp16").workspace == DEFAULT_WORKSPACE_GB * GiB
    assert load_profile("cpu").workspace_gb == 0
    p.write_text(rtx.replace("workspace_gb = 4.0", "workspace_gb = -1"))
    with pytest.raises(LlamaExportError, match="workspace_gb must be a positive number"):
        load_profile(str(p))


def test_gpu_mismatch_is_named():
    from llamaexport.tensorrt.builder import gpu_mismatch

    assert gpu_mismatch("8.9", "89") is None and gpu_mismatch("8.9", None) is None and gpu_mismatch(None, "90") is None
    assert gpu_mismatch("8.9", "80;90") == "compute capability 8.9, this machine's GPU has 8.0, 9.0"


def test_plan_json_has_every_term_the_budget_and_the_choice():
    from conftest import cli

    r = cli("plan", "--size", "13B", "--profile", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["profile"] == "cpu" and d["budget_gib"] == 14.0 and d["context"] == 2048 and d["batch"] == 1
    by = {p["label"]: p for p in d["plans"]}
    assert set(by) == {"fp32", "int8", "int4 (compact)"} and d["choice"] == "int4 (compact)" and d["error"] is None
    want = _plan("13B", "cpu", "int8", context=2048)
    got = by["int8"]
    assert got["weights_gib"] == round(want.weights / GiB, 4) and got["fits"] == want.fits
    terms = ("weights_gib", "kv_cache_gib", "activations_gib", "workspace_gib", "runtime_gib")
    assert abs(sum(got[k] for k in terms) - got["total_gib"]) < 1e-3
    r = cli("plan", "--size", "65B", "--profile", "rtx4090", "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    d = json.loads(r.stdout)
    assert d["choice"] is None and "does not fit rtx4090" in d["error"] and all(not p["fits"] for p in d["plans"])

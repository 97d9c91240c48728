"""The Recipe: every build rule resolved once, each bad request refused with one message."""

import json

import pytest

from llamaexport import LlamaExportError
from llamaexport.build.profiles import load_profile
from llamaexport.build.recipe import LM_HEAD, ROLES, Recipe, kv_cache_for
from llamaexport.model.config import config_for_size
from llamaexport.model.kv_form import KVForm

CONCAT, INPLACE = KVForm.CONCAT, KVForm.INPLACE


@pytest.mark.parametrize("request_,message", [
    (dict(precision="int9", target="ort-cpu"), "unknown precision 'int9'; choose one of fp32, fp16, int8, int4, w8a8"),
    (dict(precision="int8", target="gpu"), "unknown export target 'gpu'"),
    (dict(precision="int8", target="ort-cpu", int4_recipe="tiny"), "unknown --int4-recipe 'tiny'"),
    (dict(precision="int8", target="ort-cpu", int4_recipe="compact"), "applies to int4 only"),
    (dict(precision="int8", target="ort-cpu", block_size=48), "--block-size 48 is not supported; choose 16, 32"),
    (dict(precision="int8", target="ort-cpu", quant_method="hqq"), "unknown quantization method 'hqq'"),
    (dict(precision="w8a8", target="ort-cpu"), "w8a8 (SmoothQuant) is for TensorRT profiles"),
    (dict(precision="w8a8", target="portable", quant_method="gptq"), "does not apply to w8a8"),
])
def test_each_bad_request_gets_one_message(request_, message):
    with pytest.raises(LlamaExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.resolve(**request_)


def test_profile_precisions_are_checked_once():
    with pytest.raises(LlamaExportError, match="fp16 is not supported by profile cpu; choose one of fp32, int8, int4"):
        Recipe.candidates(load_profile("cpu"), "fp16")
    assert [str(r.precision) for r in Recipe.candidates(load_profile("rtx4090"))] == ["fp16", "int8", "int4"]
    assert [str(r.precision) for r in Recipe.every(load_profile("rtx4090"))] == ["fp16", "int8", "int4", "w8a8"]
    with pytest.raises(LlamaExportError, match="applies to int4 only"):
        Recipe.candidates(load_profile("cpu"), "auto", int4_recipe="compact")


def test_per_role_answers_cpu_and_portable():
    """int4 keeps QKV and down (portable: o too) 8-bit; the CPU int8 model's 8-bit tensors are symmetric,
    an int4 model's keep zero points; CPU 8-bit layer projections use 128-wide blocks, the output layer 32."""
    cpu8 = Recipe.resolve(precision="int8", target="ort-cpu")
    assert {r: (f.bits, f.block, f.symmetric) for r in (*ROLES.values(), LM_HEAD) if (f := cpu8.form(r))} == {
        "qkv_proj": (8, 128, True), "o_proj": (8, 128, True), "gate_up_proj": (8, 128, True),
        "down_proj": (8, 128, True), "lm_head": (8, 32, True)}
    cpu4 = Recipe.resolve(precision="int4", target="ort-cpu")
    assert {r: cpu4.tensor_precision(r) for r in (*ROLES.values(), LM_HEAD)} == {
        "qkv_proj": "int8", "o_proj": "int4", "gate_up_proj": "int4", "down_proj": "int8", "lm_head": "int8"}
    assert not cpu4.form("qkv_proj").symmetric and cpu4.form("o_proj").block == 32
    gpu4 = Recipe.resolve(precision="int4", target="portable")
    assert gpu4.tensor_precision("o_proj") == "int8" and gpu4.form(LM_HEAD) is None
    assert gpu4.form("gate_up_proj").block == 32 and not gpu4.form("gate_up_proj").nbits
    assert gpu4.activation_dtype == "float16" and cpu4.activation_dtype == "float32"
    w8a8 = Recipe.resolve(precision="w8a8", target="portable")
    assert [r for r in ROLES.values() if w8a8.quantized_input(r)] == ["qkv_proj", "gate_up_proj"]
    assert Recipe.resolve(precision="fp32", target="ort-cpu").form("qkv_proj") is None


def test_blocks_resolve_once_and_the_compact_fallback_resolves_as_compact():
    acc = Recipe.resolve(precision="int4", target="ort-cpu", calibration=True)
    assert (acc.block, acc.block8, acc.quant_method) == (32, 128, "gptq")
    com = acc.as_compact()
    assert (com.block, com.quant_method, com.label) == (64, "gptq", "int4 (compact)")
    assert {f.bits for r in (*ROLES.values(), LM_HEAD) if (f := com.form(r))} == {4}
    explicit = Recipe.resolve(precision="int4", target="ort-cpu", block_size=128, quant_method="awq")
    assert (explicit.as_compact().block, explicit.as_compact().quant_method) == (128, "awq")
    assert Recipe.resolve(precision="int4", target="portable", int4_recipe="compact").block == 32
    assert acc.with_precision("int8").precision == "int8" and acc.with_precision("int8").block8 == 128


def test_manifest_fields_are_plain_json():
    cfg = config_for_size("tiny")
    fields = Recipe.resolve(precision="int4", target="ort-cpu", int4_recipe="compact").manifest_fields(cfg)
    again = json.loads(json.dumps(fields))
    assert again == fields and type(again["precision"]) is str
    assert fields["kv_cache"] == {"form": "past_present_shared", "dtype": "float32"} and not fields["left_padding"]
    assert fields["tensor_blocks"] == {"qkv_proj": 64, "o_proj": 64, "gate_up_proj": 64, "down_proj": 64, "lm_head": 64}
    portable = Recipe.resolve(precision="fp16", target="portable").manifest_fields(cfg)
    assert portable["kv_cache"] == {"form": "past_present", "dtype": "float16"} and portable["tensor_blocks"] is None
    assert portable["tensor_precisions"]["embedding"] == "fp16" and portable["block_size"] is None
    assert fields["graph"] == {"opset": 21, "attention": "GroupQueryAttention", "kv_update": "GroupQueryAttention",
                               "min_tensorrt": None}
    assert portable["graph"] == {"opset": 21, "attention": "MatMul-Softmax-MatMul", "kv_update": "Concat",
                                 "min_tensorrt": "10.0"}


def test_kv_cache_form_follows_the_tensorrt_that_builds_the_engine():
    """auto: in place (TensorScatter -> IKVCacheUpdateLayer, Attention -> IAttention) for TensorRT >= 10.15,
    concat below (JetPack 6's 10.3); the TensorRT installed for the build wins over the profile's
    tensorrt_version; an explicit --kv-cache wins over both; the CPU graph has its own in-place cache."""
    rtx, orin, cpu = (load_profile(n) for n in ("rtx4090", "jetson-orin-nano-8gb", "cpu"))
    assert (rtx.tensorrt_version, orin.tensorrt_version) == ("10.15", "10.3")
    assert kv_cache_for(rtx) is INPLACE and kv_cache_for(orin) is CONCAT
    assert kv_cache_for(rtx, tensorrt="10.8.0.43") is CONCAT and kv_cache_for(orin, tensorrt="10.16.0.72") is INPLACE
    assert kv_cache_for(orin, "inplace") is INPLACE and kv_cache_for(rtx, "concat", tensorrt="11.1") is CONCAT
    assert kv_cache_for(cpu) is CONCAT
    with pytest.raises(LlamaExportError, match="--kv-cache inplace is for GPU profiles"):
        kv_cache_for(cpu, "inplace")
    with pytest.raises(LlamaExportError, match="--kv-cache inplace is for GPU profiles"):
        Recipe.resolve(precision="int8", target="ort-cpu", kv_cache="inplace")
    inplace = Recipe.candidates(rtx, "fp16", kv_cache=kv_cache_for(rtx))[0]
    f = inplace.manifest_fields(config_for_size("tiny"))
    assert f["kv_cache"] == {"form": "past_present_shared", "dtype": "float16"} and f["left_padding"]
    assert f["graph"] == {"opset": 24, "attention": "Attention", "kv_update": "TensorScatter", "min_tensorrt": "10.15"}
    assert inplace.with_precision("int8").kv_cache is INPLACE and inplace.with_precision("int4").as_compact().inplace_kv


def test_onnxruntime_gpu_profile_gets_the_portable_graph(tmp_path):
    """An onnxruntime profile whose [runtime] device is cuda gets the portable graph (standard ops, fp16),
    which ONNX Runtime's CUDA provider runs whole; device cuda on a TensorRT profile, or another device,
    is refused."""
    base = ('name = "g"\nbackend = "{b}"\nmemory_gb = 16.0\nmemory_bandwidth_gbs = 500.0\n'
            'precisions = ["fp16", "int8"]\ndefault_context = 256\n{extra}\n[runtime]\ndevice = "{d}"\n')
    p = tmp_path / "g.toml"
    p.write_text(base.format(b="onnxruntime", d="cuda", extra=""))
    prof = load_profile(str(p))
    assert prof.device == "cuda" and Recipe.candidates(prof, "fp16")[0].target == "portable"
    assert kv_cache_for(prof) is CONCAT and load_profile("cpu").device == "cpu"
    for b, d, extra, msg in (("tensorrt", "cuda", "", "device must be cpu or cuda (onnxruntime profiles"),
                             ("onnxruntime", "gpu", "", "device must be cpu or cuda"),
                             ("tensorrt", "cpu", 'tensorrt_version = "ten"', "tensorrt_version must be a version")):
        p.write_text(base.format(b=b, d=d, extra=extra))
        with pytest.raises(LlamaExportError, match=msg.replace("(", r"\(")):
            load_profile(str(p))

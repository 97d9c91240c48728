"""Op tier for the TensorRT plugins in plugins/: each plugin's kernel and plugin against a reference.

  build   - cmake + nvcc build of the kernels (LLAMAEXPORT_KERNELS_ONLY) and their C API; skips without nvcc/cmake
  CPU     - the C API refuses bad arguments; the torch references equal our ONNX function bodies (ORT)
  GPU     - kernels vs the float32 torch reference; skips with "no CUDA GPU"
  TensorRT- the plugin library loaded into TensorRT, ONNX nodes parsed into plugin layers, engine vs
            the reference; skips with "TensorRT not installed" (never mocked)
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llamaexport.build.onnx_graph import OPSET

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
# One architecture keeps the test build to seconds on 2 cores; "80" also embeds compute_80 PTX,
# so any GPU from sm_80 up can JIT it.
TEST_CUDA_ARCH = "80"
CUDA_ERROR_INVALID_VALUE = 1


def _load_gpu_kernels():
    spec = importlib.util.spec_from_file_location("gpu_kernels", REPO / "scripts" / "gpu_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gk = _load_gpu_kernels()  # torch is imported inside its functions only


def _run(cmd, *, timeout=600):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def _cmake_build(build_dir: Path, *extra: str):
    try:
        nvcc = gk.find_nvcc()
    except gk.SetupError as e:
        pytest.skip(str(e))
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found: install cmake >= 3.18 to build the plugins")
    _run([cmake, "-S", PLUGINS, "-B", build_dir, f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_BUILD_TYPE=Release",
          *extra])
    _run([cmake, "--build", build_dir, "-j2"])
    return build_dir


@pytest.fixture(scope="session")
def kernels_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("plugins-kernels")
    return _cmake_build(build, "-DLLAMAEXPORT_KERNELS_ONLY=ON", f"-DCMAKE_CUDA_ARCHITECTURES={TEST_CUDA_ARCH}")


@pytest.fixture(scope="session")
def capi(kernels_build):
    lib = ctypes.CDLL(str(kernels_build / "libllamaexport_kernels_capi.so"))
    lib.llamaexport_error_string.restype = ctypes.c_char_p
    return lib


# ---------------------------------------------------------------------------------------------------------------------
# build + CPU tiers

def test_kernels_build_in_kernels_only_mode(kernels_build):
    for name in ("libllamaexport_kernels.a", "libllamaexport_kernels_capi.so", "kernel_smoke"):
        assert (kernels_build / name).is_file(), name
    assert not (kernels_build / "libllamaexport_plugins.so").exists()


def test_kernel_smoke_executable(kernels_build):
    res = subprocess.run([str(kernels_build / "kernel_smoke")], capture_output=True, text=True, timeout=300)
    if res.returncode == 77:
        pytest.skip("no CUDA GPU")
    assert res.returncode == 0, res.stdout + res.stderr


# llamaexport_rope(x_dtype, table_dtype, B, H, S, head_dim, rotary_dim, table_batch, interleaved) -> cudaError_t
ROPE_ARG_CASES = [
    ((1, 1, 1, 2, 3, 8, 3, 1, 1), CUDA_ERROR_INVALID_VALUE, "odd rotary_dim"),
    ((1, 1, 1, 2, 3, 8, 10, 1, 1), CUDA_ERROR_INVALID_VALUE, "rotary_dim > head_dim"),
    ((1, 2, 1, 2, 3, 8, 8, 1, 1), CUDA_ERROR_INVALID_VALUE, "bf16 table with fp16 x"),
    ((1, 1, 2, 2, 3, 8, 8, 3, 1), CUDA_ERROR_INVALID_VALUE, "table batch 3 with batch 2"),
    ((9, 9, 1, 2, 3, 8, 8, 1, 1), CUDA_ERROR_INVALID_VALUE, "unknown dtype"),
    ((1, 1, 0, 2, 3, 8, 8, 0, 1), 0, "empty batch: nothing to launch"),
]


def test_c_api_refuses_bad_arguments_before_touching_the_gpu(capi):
    null = ctypes.c_void_p(0)
    for args, expected, why in ROPE_ARG_CASES:
        assert capi.llamaexport_rope(null, null, null, null, null, *args) == expected, why
    swiglu = capi.llamaexport_swiglu
    swiglu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    assert swiglu(null, null, null, 7, 4, 8) == CUDA_ERROR_INVALID_VALUE
    assert swiglu(null, null, null, 1, 0, 8) == 0
    assert capi.llamaexport_error_string(CUDA_ERROR_INVALID_VALUE) == b"invalid argument"


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (16, 8)])
def test_rope_reference_equals_the_onnx_function_body(interleaved, head_dim, rotary_dim):
    """The kernels are checked against rope_ref; rope_ref must mean what our exported graph means."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")

    B, H, S = 2, 3, 5
    x = torch.randn(B, H, S, head_dim)
    ang = torch.rand(B, S, rotary_dim // 2) * 6.0
    cos, sin = ang.cos(), ang.sin()
    model = _rope_model(B, H, S, head_dim, rotary_dim, interleaved=interleaved, elem_type=1, with_function=True,
                        dynamic=False)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy(), "cos": cos.numpy(), "sin": sin.numpy()})
    ref = gk.rope_ref(x, cos, sin, interleaved=interleaved, rotary_dim=rotary_dim)
    assert float((torch.from_numpy(y) - ref).abs().max()) < 1e-5


def test_swiglu_reference_equals_the_onnx_function_body():
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")

    x = torch.randn(2, 5, 24) * 4
    model = _swiglu_model((2, 5, 24), elem_type=1, with_function=True, dynamic=False)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    assert float((torch.from_numpy(y) - gk.swiglu_ref(x)).abs().max()) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# the TensorRT version a plugin library is built for (no TensorRT needed)

# The version lines of include/NvInferVersion.h, NVIDIA/TensorRT release/10.3 (numbers) and release/11.1
# (10.15 and later: through the *_ENTERPRISE macros).
NVINFER_VERSION_H = {
    (10, 3, 0): """#define NV_TENSORRT_MAJOR 10 //!< TensorRT major version.
#define NV_TENSORRT_MINOR 3 //!< TensorRT minor version.
#define NV_TENSORRT_PATCH 0 //!< TensorRT patch version.
#define NV_TENSORRT_BUILD 26 //!< TensorRT build number.
""",
    (11, 1, 0): """#define TRT_MAJOR_ENTERPRISE 11
#define TRT_MINOR_ENTERPRISE 1
#define TRT_PATCH_ENTERPRISE 0
#define TRT_BUILD_ENTERPRISE 106
#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE //!< TensorRT major version.
#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE //!< TensorRT minor version.
#define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE //!< TensorRT patch version.
""",
}


def _headers(root: Path, version: tuple[int, int, int]) -> Path:
    inc = root / "include"
    inc.mkdir(parents=True)
    (inc / "NvInferVersion.h").write_text("#ifndef NV_INFER_VERSION_H\n" + NVINFER_VERSION_H[version] + "#endif\n")
    (inc / "NvInferRuntime.h").write_text("")
    return inc


def test_tensorrt_header_version_reads_both_forms_of_the_header(tmp_path):
    from llamaexport import LlamaExportError
    from llamaexport.tensorrt.plugins import find_tensorrt_headers, tensorrt_header_version

    for v in NVINFER_VERSION_H:
        assert tensorrt_header_version(_headers(tmp_path / f"trt-{v[0]}.{v[1]}", v)) == v
    assert find_tensorrt_headers(tmp_path / "trt-11.1") == [(tmp_path / "trt-11.1" / "include", (11, 1, 0))]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "NvInferVersion.h").write_text("#define NV_TENSORRT_MAJOR SOMETHING_UNDEFINED\n")
    with pytest.raises(LlamaExportError, match="does not define NV_TENSORRT_MAJOR"):
        tensorrt_header_version(bad)
    with pytest.raises(LlamaExportError, match="cannot read .*NvInferVersion.h"):
        tensorrt_header_version(tmp_path)
    with pytest.raises(LlamaExportError, match="no include/NvInferRuntime.h under"):
        find_tensorrt_headers(tmp_path)


def test_plugins_build_takes_the_headers_of_the_installed_tensorrt_major(tmp_path):
    from llamaexport import LlamaExportError
    from llamaexport.tensorrt.plugins import select_tensorrt_headers

    found = [(tmp_path / "a", (10, 16, 0)), (tmp_path / "b", (11, 1, 0))]
    assert select_tensorrt_headers(found, "11.0.0.114") == found[1]
    assert select_tensorrt_headers(found, "10.3.0") == found[0]  # same major: the interfaces match
    assert select_tensorrt_headers(found, None) == found[0]      # no package here: the first, said so
    with pytest.raises(LlamaExportError) as e:
        select_tensorrt_headers(found[:1], "11.1.0")
    assert str(e.value) == (f"the TensorRT headers found (10.16.0 in {tmp_path / 'a'}) do not match the installed "
                            "tensorrt 11.1.0: a plugin library loads only into the TensorRT major it was built for; "
                            "pass --tensorrt-root with TensorRT 11.x headers (its tar/zip install, or libnvinfer-dev)")
    with pytest.raises(LlamaExportError, match="TensorRT headers not found"):
        select_tensorrt_headers([], "10.16.0")


def test_plugins_build_refuses_headers_without_a_version_in_one_line(tmp_path):
    from conftest import assert_clean_error, cli

    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")  # `plugins build` checks cmake and nvcc before the headers
    try:
        gk.find_nvcc()
    except gk.SetupError as e:
        pytest.skip(str(e))
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "NvInferRuntime.h").write_text("")
    (inc / "NvInferVersion.h").write_text("#define NV_TENSORRT_MAJOR\n")
    assert_clean_error(cli("plugins", "build", "--tensorrt-root", tmp_path, "--cuda-arch", TEST_CUDA_ARCH),
                       "NvInferVersion.h does not define NV_TENSORRT_MAJOR, _MINOR and _PATCH as numbers")


def _shared_object(d: Path, source: str) -> Path:
    """Compile `source` (C) into a real shared object with the system C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the test library")
    src, lib = d / "lib.c", d / "libversion_test.so"
    src.write_text(source)
    _run([cc, "-shared", "-fPIC", "-o", lib, src])
    return lib


def test_a_library_built_for_another_tensorrt_major_is_refused_before_tensorrt_sees_it(tmp_path):
    """The loader reads the version the library records (plugins/plugin_api.cpp exports it) with ctypes
    and refuses a major mismatch in one line naming both versions, before IPluginRegistry::loadLibrary."""
    from llamaexport import LlamaExportError
    from llamaexport.tensorrt.plugins import check_plugin_library

    (tmp_path / "v").mkdir()
    lib = _shared_object(tmp_path / "v", "int llamaexport_plugins_trt_major(void) { return 10; }\n"
                                         "int llamaexport_plugins_trt_minor(void) { return 16; }\n")
    assert check_plugin_library(lib, "10.3.0") == (10, 16)
    with pytest.raises(LlamaExportError) as e:
        check_plugin_library(lib, "11.1.0")
    assert str(e.value) == (f"the plugin library {lib} was built against TensorRT 10.16 headers but this is TensorRT "
                            "11.1.0: a plugin library loads only into the TensorRT major it was built for; rebuild it "
                            "with `llamaexport plugins build` and the TensorRT 11.x headers")
    (tmp_path / "old").mkdir()
    old = _shared_object(tmp_path / "old", "int getCreators(void) { return 0; }\n")  # a library from before
    with pytest.raises(LlamaExportError, match="does not say which TensorRT it was built for"):
        check_plugin_library(old, "10.16.0")
    with pytest.raises(LlamaExportError, match="cannot load the plugin library"):
        check_plugin_library(tmp_path / "v" / "lib.c", "10.16.0")


def test_the_plugin_library_records_the_version_of_its_headers(tmp_path_factory):
    """The real libllamaexport_plugins.so, built against the TensorRT headers found here (TensorRT_ROOT),
    exports their major and minor; needs only the headers (the library does not link libnvinfer)."""
    from llamaexport import LlamaExportError
    from llamaexport.tensorrt.plugins import check_plugin_library, tensorrt_header_version

    root = _trt_headers()
    if root is None:
        pytest.skip("TensorRT headers not found (the pip wheels ship none): set TensorRT_ROOT to a TensorRT install")
    include = Path(root) / "include" if (Path(root) / "include" / "NvInferRuntime.h").is_file() else Path(root)
    major, minor, _ = tensorrt_header_version(include)
    build = _cmake_build(tmp_path_factory.mktemp("plugins-version"), f"-DTensorRT_INCLUDE_DIR={include}",
                         f"-DCMAKE_CUDA_ARCHITECTURES={TEST_CUDA_ARCH}")
    lib = build / "libllamaexport_plugins.so"
    assert check_plugin_library(lib, f"{major}.{minor}.0") == (major, minor)
    other = 11 if major == 10 else 10
    with pytest.raises(LlamaExportError, match=f"built against TensorRT {major}.{minor} headers but this is TensorRT {other}"):
        check_plugin_library(lib, f"{other}.0.0")


# ---------------------------------------------------------------------------------------------------------------------
# GPU tier: kernels through the C API vs torch

# (B, H, S, head_dim, rotary_dim): vector path, H not a multiple of 4, decode, partial rotary, scalar fallback
ROPE_CASES = [(2, 5, 7, 64, 64), (1, 8, 1, 128, 128), (2, 3, 9, 128, 64), (1, 2, 3, 10, 6)]
# x shapes; the last dim is 2F (F = 13 forces the scalar fallback)
SWIGLU_CASES = [(2, 3, 192), (1, 1, 3072), (5, 26)]


@pytest.fixture(scope="session")
def gpu_kernels(kernels_build):
    torch = pytest.importorskip("torch", reason="no CUDA GPU (torch not installed)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the kernels are built for sm_80 and newer")
    return gk.Kernels(kernels_build / "libllamaexport_kernels_capi.so")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("table", ["same", "float32", "broadcast"])
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_rope_kernel_matches_torch(gpu_kernels, dtype, interleaved, table, case):
    import torch

    B, H, S, hd, rd = case
    dt = getattr(torch, dtype)
    x, cos, sin = gk.rope_inputs(B, H, S, hd, rd, dt, table_dtype=torch.float32 if table == "float32" else None)
    if table == "broadcast":
        cos, sin = cos[:1].contiguous(), sin[:1].contiguous()
    y = gpu_kernels.rope(x, cos, sin, interleaved=interleaved, rotary_dim=rd)
    err, ok = gk.max_err(y, gk.rope_ref(x, cos, sin, interleaved=interleaved, rotary_dim=rd), dtype)
    assert ok, f"max abs err {err:.3g} over tolerance {gk.TOLERANCES[dtype]}"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SWIGLU_CASES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_kernel_matches_torch(gpu_kernels, dtype, shape):
    import torch

    x = (torch.randn(*shape, device="cuda") * 4).to(getattr(torch, dtype))
    err, ok = gk.max_err(gpu_kernels.swiglu(x), gk.swiglu_ref(x), dtype)
    assert ok, f"max abs err {err:.3g} over tolerance {gk.TOLERANCES[dtype]}"


def test_unaligned_views_use_the_fallback_correctly(gpu_kernels):
    import torch

    x, cos, sin = gk.rope_inputs(1, 4, 5, 64, 64, torch.float16)
    xs = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    ys = torch.empty_like(xs)
    xv, yv = xs[1:].view(x.shape), ys[1:].view(x.shape)  # 2-byte offset: no 16-byte vectors
    xv.copy_(x)
    gpu_kernels.rope(xv, cos, sin, interleaved=True, out=yv)
    assert gk.max_err(yv, gk.rope_ref(x, cos, sin, interleaved=True, rotary_dim=64), "float16")[1]
    g = torch.randn(3, 2 * 64, device="cuda", dtype=torch.bfloat16)
    gs = torch.empty(g.numel() + 1, dtype=g.dtype, device="cuda")
    gv = gs[1:].view(g.shape)
    gv.copy_(g)
    assert gk.max_err(gpu_kernels.swiglu(gv), gk.swiglu_ref(g), "bfloat16")[1]


# ---------------------------------------------------------------------------------------------------------------------
# TensorRT tier: the plugin library behind TensorRT's ONNX parser

def _trt_headers() -> str | None:
    roots = [os.environ.get("TensorRT_ROOT"), os.environ.get("TRT_ROOT")]
    cands = [Path(r) / "include" for r in roots if r]
    cands += [Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include")]
    for c in cands:
        if (c / "NvInferRuntime.h").is_file():
            return str(c.parent if c.name == "include" else c)
    return None


@pytest.fixture(scope="session")
def trt_plugins(tmp_path_factory):
    """(tensorrt module, path of libllamaexport_plugins.so), the library loaded into the plugin registry."""
    trt = pytest.importorskip("tensorrt", reason="TensorRT not installed")
    torch = pytest.importorskip("torch", reason="no CUDA GPU (torch not installed)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    lib = os.environ.get("LLAMAEXPORT_PLUGIN_LIB")
    if not lib:
        root = _trt_headers()
        if root is None:
            pytest.skip("TensorRT headers not found (the pip wheels ship none): set TensorRT_ROOT to a TensorRT "
                        "install, or LLAMAEXPORT_PLUGIN_LIB to a built libllamaexport_plugins.so")
        major, minor = torch.cuda.get_device_capability()
        build = _cmake_build(tmp_path_factory.mktemp("plugins-trt"), f"-DTensorRT_ROOT={root}",
                             f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}")
        lib = build / "libllamaexport_plugins.so"
    from llamaexport.tensorrt.plugins import check_plugin_library

    check_plugin_library(lib, trt.__version__)
    handle = trt.get_plugin_registry().load_library(str(lib))
    assert handle is not None, f"IPluginRegistry::loadLibrary refused {lib}"
    return trt, Path(lib)


def _trt_version(trt) -> tuple[int, int]:
    major, minor = trt.__version__.split(".")[:2]
    return int(major), int(minor)


def _rope_model(B, H, S, hd, rd, *, interleaved, elem_type, with_function, dynamic=True):
    """One RoPE node as we export it; dynamic: B and S are named dims (B, S values unused)."""
    from onnx import helper

    from llamaexport.build import custom_ops

    b, s = ("B", "S") if dynamic else (B, S)
    node = helper.make_node("RoPE", ["x", "cos", "sin"], ["y"], name="/rope/RoPE", domain=custom_ops.DOMAIN,
                            interleaved=int(interleaved), rotary_dim=rd, **custom_ops.plugin_attrs())
    graph = helper.make_graph(
        [node], "rope",
        [helper.make_tensor_value_info("x", elem_type, [b, H, s, hd]),
         helper.make_tensor_value_info("cos", elem_type, [b, s, rd // 2]),
         helper.make_tensor_value_info("sin", elem_type, [b, s, rd // 2])],
        [helper.make_tensor_value_info("y", elem_type, [b, H, s, hd])])
    functions = [custom_ops.rope_function(head_dim=hd, rotary_dim=rd, interleaved=interleaved)] if with_function else []
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("llamaexport", 1)],
                             functions=functions, ir_version=10)


def _swiglu_model(shape, *, elem_type, with_function, dynamic=True):
    """One SwiGLU node as we export it; dynamic: the first dim is named."""
    from onnx import helper

    from llamaexport.build import custom_ops

    lead = ["N"] + list(shape[1:-1]) if dynamic else list(shape[:-1])
    node = helper.make_node("SwiGLU", ["x"], ["y"], name="/mlp/act/SwiGLU", domain=custom_ops.DOMAIN,
                            **custom_ops.plugin_attrs())
    graph = helper.make_graph([node], "swiglu", [helper.make_tensor_value_info("x", elem_type, lead + [shape[-1]])],
                              [helper.make_tensor_value_info("y", elem_type, lead + [shape[-1] // 2])])
    functions = [custom_ops.swiglu_function()] if with_function else []
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("llamaexport", 1)],
                             functions=functions, ir_version=10)


def _run_trt(trt, model, feeds: dict, profile: dict):
    """Parse, build, run. Returns (output tensor, number of PluginV3 layers in the parsed network)."""
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise AssertionError(f"ONNX parse failed: {errors}")
    n_plugins = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    config = builder.create_builder_config()
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    blob = builder.build_serialized_network(network, config)
    assert blob is not None, "engine build failed"
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    context = engine.create_execution_context()
    for name, t in feeds.items():
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())
    first = next(iter(feeds.values()))
    out = torch.empty(tuple(context.get_tensor_shape("y")), dtype=first.dtype, device="cuda")
    context.set_tensor_address("y", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return out, n_plugins


ONNX_ELEM = {"float32": 1, "float16": 10, "bfloat16": 16}


def _rope_profile(H, hd, rd, *, opt, max_bs=(4, 64)):
    """min / opt / max shapes for x, cos, sin with (B, S) = (1, 1), opt, max_bs."""
    shapes = lambda b, s: {"x": (b, H, s, hd), "cos": (b, s, rd // 2), "sin": (b, s, rd // 2)}  # noqa: E731
    lo, mid, hi = shapes(1, 1), shapes(*opt), shapes(*max_bs)
    return {n: (lo[n], mid[n], hi[n]) for n in lo}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_plugin_through_the_onnx_parser(trt_plugins, dtype, interleaved):
    import torch

    trt, _ = trt_plugins
    H, hd, rd = 4, 64, 32
    model = _rope_model(0, H, 0, hd, rd, interleaved=interleaved, elem_type=ONNX_ELEM[dtype], with_function=False)
    x, cos, sin = gk.rope_inputs(2, H, 7, hd, rd, getattr(torch, dtype))
    y, n_plugins = _run_trt(trt, model, {"x": x, "cos": cos, "sin": sin}, _rope_profile(H, hd, rd, opt=(2, 7)))
    assert n_plugins == 1
    err, ok = gk.max_err(y, gk.rope_ref(x, cos, sin, interleaved=interleaved, rotary_dim=rd), dtype)
    assert ok, f"max abs err {err:.3g}"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_swiglu_plugin_through_the_onnx_parser(trt_plugins, dtype):
    import torch

    trt, _ = trt_plugins
    model = _swiglu_model((0, 5, 96), elem_type=ONNX_ELEM[dtype], with_function=False)
    x = (torch.randn(3, 5, 96, device="cuda") * 3).to(getattr(torch, dtype))
    y, n_plugins = _run_trt(trt, model, {"x": x}, {"x": ((1, 5, 96), (3, 5, 96), (8, 5, 96))})
    assert n_plugins == 1
    err, ok = gk.max_err(y, gk.swiglu_ref(x), dtype)
    assert ok, f"max abs err {err:.3g}"


def test_plugin_wins_over_the_local_function_as_exported(trt_plugins):
    """Our graphs carry both a function body and plugin_namespace. TensorRT >= 10.7 picks the plugin (10.15+
    because of plugin_namespace); 10.0-10.6 always expand the local function."""
    import torch

    trt, _ = trt_plugins
    H, hd = 2, 32
    model = _rope_model(0, H, 0, hd, hd, interleaved=True, elem_type=ONNX_ELEM["float16"], with_function=True)
    x, cos, sin = gk.rope_inputs(1, H, 3, hd, hd, torch.float16)
    y, n_plugins = _run_trt(trt, model, {"x": x, "cos": cos, "sin": sin}, _rope_profile(H, hd, hd, opt=(1, 3)))
    assert n_plugins == (1 if _trt_version(trt) >= (10, 7) else 0)
    assert gk.max_err(y, gk.rope_ref(x, cos, sin, interleaved=True, rotary_dim=hd), "float16")[1]

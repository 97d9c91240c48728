"""Check and time the plugin CUDA kernels (RoPE, SwiGLU) on a GPU, without TensorRT.

Needs torch with CUDA and nvcc. Compiles plugins/*Kernel.cu plus their C API into a small
shared library for the local GPU, calls it through ctypes on torch tensors, and for decode
(S=1) and prefill (S=2048) shapes of a LLaMA-7B and a SmolLM2-135M layer, in fp16 and bf16:

  * compares with a float32 torch reference (max abs error, tolerances below); exit 1 on a miss;
  * times ours, torch.compile of the same reference, and a device-to-device copy moving the same
    number of bytes (CUDA graphs of back-to-back calls, CUDA events, median of repeats), and
    prints GB/s = (bytes read + bytes written) / time.

    python scripts/gpu_kernels.py            # about a minute on an H100, most of it torch.compile
    python scripts/gpu_kernels.py --no-compile --iters 20

tests/test_plugins.py reuses Kernels, rope_ref, swiglu_ref and TOLERANCES from here.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
KERNEL_SOURCES = ["ropePlugin/ropeKernel.cu", "swigluPlugin/swigluKernel.cu", "common/kernelApi.cpp"]
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # llamaexport::DType

# (atol, rtol) per output dtype: |ours - ref| <= atol + rtol * |ref|, ref in float32 from the same inputs.
TOLERANCES = {"float32": (1e-5, 1e-5), "float16": (1e-3, 2e-3), "bfloat16": (1e-2, 1.6e-2)}

# name: (heads, head_dim) of the tensors RoPE sees; (ffn_dim,) for SwiGLU
ROPE_SHAPES = {"7B q": (32, 128), "7B k (GQA 8)": (8, 128), "SmolLM2 q": (9, 64), "SmolLM2 k": (3, 64)}
SWIGLU_SHAPES = {"7B": 11008, "SmolLM2": 1536}
SEQ_LENS = {"decode": 1, "prefill": 2048}


class SetupError(RuntimeError):
    """The machine lacks something this script needs (GPU, torch.cuda, nvcc)."""


def find_nvcc() -> str:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    raise SetupError("nvcc not found: install the CUDA toolkit or put its bin/ on PATH")


def build_library(out_dir: Path, *, arch: str | None = None) -> Path:
    """Compile the kernels + C API with nvcc into out_dir/libllamaexport_kernels_capi.so.

    arch: e.g. "90"; default: the current torch device's compute capability.
    """
    import torch

    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
    out = Path(out_dir) / "libllamaexport_kernels_capi.so"
    cmd = [find_nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler=-fPIC,-fvisibility=hidden",
           f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]", f"-I{PLUGINS}",
           *[str(PLUGINS / s) for s in KERNEL_SOURCES], "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{res.stderr}")
    return out


class Kernels:
    """ctypes binding of plugins/common/kernelApi.h; takes and returns torch CUDA tensors."""

    def __init__(self, lib_path: Path):
        lib = ctypes.CDLL(str(lib_path))
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.llamaexport_rope.argtypes = [p, p, p, p, p, i, i, i, i, i, i, i, i, i]
        lib.llamaexport_rope.restype = i
        lib.llamaexport_swiglu.argtypes = [p, p, p, i, ctypes.c_int64, i]
        lib.llamaexport_swiglu.restype = i
        lib.llamaexport_error_string.argtypes = [i]
        lib.llamaexport_error_string.restype = ctypes.c_char_p
        self.lib = lib

    def _check(self, code: int, what: str):
        if code != 0:
            raise RuntimeError(f"{what} failed: {self.lib.llamaexport_error_string(code).decode()}")

    @staticmethod
    def _code(t) -> int:
        return DTYPE_CODES[str(t.dtype).removeprefix("torch.")]

    def rope(self, x, cos, sin, *, interleaved: bool, rotary_dim: int | None = None, out=None):
        """x [B, H, S, hd]; cos/sin [B or 1, S, rd/2] -> y like x."""
        import torch

        B, H, S, hd = x.shape
        rd = 2 * cos.shape[-1] if rotary_dim is None else rotary_dim
        y = torch.empty_like(x) if out is None else out
        for t in (x, cos, sin, y):
            assert t.is_cuda and t.is_contiguous(), "tensors must be contiguous CUDA tensors"
        stream = torch.cuda.current_stream().cuda_stream
        self._check(self.lib.llamaexport_rope(stream, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(),
                                              self._code(x), self._code(cos), B, H, S, hd, rd, cos.shape[0],
                                              int(interleaved)), "llamaexport_rope")
        return y

    def swiglu(self, x, *, out=None):
        """x [..., 2F] -> y [..., F]."""
        import torch

        F = x.shape[-1] // 2
        y = torch.empty(*x.shape[:-1], F, dtype=x.dtype, device=x.device) if out is None else out
        assert x.is_contiguous() and y.is_contiguous()
        rows = x.numel() // max(x.shape[-1], 1)
        self._check(self.lib.llamaexport_swiglu(torch.cuda.current_stream().cuda_stream, x.data_ptr(), y.data_ptr(),
                                                self._code(x), rows, F), "llamaexport_swiglu")
        return y


def rope_ref(x, cos, sin, *, interleaved: bool, rotary_dim: int):
    """Float32 reference. x [B, H, S, hd]; cos/sin [B|1, S, rd/2]."""
    import torch

    rd = rotary_dim
    xf = x.float()
    c, s = cos.float()[:, None], sin.float()[:, None]  # [B|1, 1, S, rd/2]
    xr, xp = xf[..., :rd], xf[..., rd:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    rot = torch.stack([o1, o2], dim=-1).flatten(-2) if interleaved else torch.cat([o1, o2], dim=-1)
    return torch.cat([rot, xp], dim=-1).to(x.dtype)


def swiglu_ref(x):
    """Float32 reference: silu(x[..., :F]) * x[..., F:]."""
    import torch.nn.functional as F

    g, u = x.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(x.dtype)


def rope_inputs(B, H, S, hd, rd, dtype, *, table_dtype=None, seed=0):
    """Random x and cos/sin tables of real angles (positions S..2S-1, LLaMA frequencies)."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, H, S, hd, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rd, 2, device="cuda", dtype=torch.float32) / rd))
    pos = torch.arange(S, 2 * S, device="cuda", dtype=torch.float32)
    ang = (pos[:, None] * inv_freq[None]).expand(B, S, rd // 2).contiguous()  # [B, S, rd/2]
    td = table_dtype or dtype
    return x, ang.cos().to(td), ang.sin().to(td)


def max_err(out, ref, dtype_name):
    """(max abs error, ok) under TOLERANCES[dtype_name]."""
    atol, rtol = TOLERANCES[dtype_name]
    diff = (out.float() - ref.float()).abs()
    ok = bool((diff <= atol + rtol * ref.float().abs()).all())
    return float(diff.max()), ok


def gpu_time_us(fn, *, iters: int, reps: int = 15) -> float:
    """Median GPU time per call: a CUDA graph of `iters` back-to-back calls, replayed `reps` times."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        run = graph.replay
        per_run = iters
    except Exception:  # e.g. a torch.compile'd fn that refuses capture: time it eagerly
        torch.cuda.synchronize()
        run, per_run = (lambda: [fn() for _ in range(iters)]), iters
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_run)
    return statistics.median(times)


def copy_time_us(nbytes: int, *, iters: int) -> float:
    """Time of a device-to-device copy that reads nbytes/2 and writes nbytes/2."""
    import torch

    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return gpu_time_us(lambda: dst.copy_(src), iters=iters)


def run_cases(kernels: Kernels, *, compile_ref: bool, iters: int):
    """Yield one result dict per (op, shape, dtype)."""
    import torch
    import torch._dynamo

    # One compiled function serves every shape/dtype here: allow the recompiles instead of silently
    # falling back to eager after the default limit of 8.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    rope_c = torch.compile(rope_ref) if compile_ref else None
    swiglu_c = torch.compile(swiglu_ref) if compile_ref else None
    for dtype in (torch.float16, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")
        for phase, S in SEQ_LENS.items():
            n = iters * (20 if S == 1 else 1)
            cases = [(name, H, hd, True, None) for name, (H, hd) in ROPE_SHAPES.items()]
            cases += [("7B q halves", 32, 128, False, None), ("7B q fp32 table", 32, 128, True, torch.float32)]
            for name, H, hd, interleaved, tdt in cases:
                x, cos, sin = rope_inputs(1, H, S, hd, hd, dtype, table_dtype=tdt)
                y = torch.empty_like(x)
                err, ok = max_err(kernels.rope(x, cos, sin, interleaved=interleaved),
                                  rope_ref(x, cos, sin, interleaved=interleaved, rotary_dim=hd), dname)
                nbytes = 2 * x.nbytes + cos.nbytes + sin.nbytes
                res = dict(op="RoPE", shape=f"{name} {phase} [1,{H},{S},{hd}]", dtype=dname, err=err, ok=ok,
                           bytes=nbytes,
                           ours=gpu_time_us(lambda: kernels.rope(x, cos, sin, interleaved=interleaved, out=y),
                                            iters=n),
                           copy=copy_time_us(nbytes, iters=n))
                if rope_c is not None:
                    res["compiled"] = gpu_time_us(
                        lambda: rope_c(x, cos, sin, interleaved=interleaved, rotary_dim=hd), iters=n)
                yield res
            for name, F in SWIGLU_SHAPES.items():
                gen = torch.Generator(device="cuda").manual_seed(1)
                x = torch.randn(1, S, 2 * F, generator=gen, device="cuda").to(dtype)
                y = torch.empty(1, S, F, dtype=dtype, device="cuda")
                err, ok = max_err(kernels.swiglu(x), swiglu_ref(x), dname)
                nbytes = x.nbytes + y.nbytes
                res = dict(op="SwiGLU", shape=f"{name} {phase} [1,{S},{2 * F}]", dtype=dname, err=err, ok=ok,
                           bytes=nbytes, ours=gpu_time_us(lambda: kernels.swiglu(x, out=y), iters=n),
                           copy=copy_time_us(nbytes, iters=n))
                if swiglu_c is not None:
                    res["compiled"] = gpu_time_us(lambda: swiglu_c(x), iters=n)
                yield res


def print_row(r):
    def gbs(us):
        return f"{r['bytes'] / (us * 1e3):8.0f}" if us else "       -"

    comp = r.get("compiled")
    print(f"{r['op']:<7}{r['shape']:<42}{r['dtype']:<9}{r['err']:9.2e} {'ok  ' if r['ok'] else 'FAIL'}"
          f"{r['ours']:9.2f}{gbs(r['ours'])}{(comp or 0):9.2f}{gbs(comp)}{gbs(r['copy'])}"
          f"{100 * r['copy'] / r['ours']:7.0f}%", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50, help="calls per CUDA graph for prefill (x20 for decode)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--build-dir", type=Path, help="where to build the .so (default: a temp dir)")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("gpu_kernels.py needs torch with CUDA (pip install torch)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine", file=sys.stderr)
        return 2
    try:
        find_nvcc()
    except SetupError as e:
        print(e, file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        build_dir = args.build_dir or Path(tmp)
        build_dir.mkdir(parents=True, exist_ok=True)
        lib = build_library(build_dir)
        kernels = Kernels(lib)
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  library {lib}")
        print(f"{'op':<7}{'shape':<42}{'dtype':<9}{'max_err':>9} ok  {'ours_us':>9}{'GB/s':>8}"
              f"{'comp_us':>9}{'GB/s':>8}{'copyGB/s':>8}{'vs_copy':>8}")
        failures = 0
        for r in run_cases(kernels, compile_ref=not args.no_compile, iters=args.iters):
            print_row(r)
            failures += not r["ok"]
    if failures:
        print(f"{failures} case(s) exceeded the tolerance", file=sys.stderr)
        return 1
    print("all cases within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())

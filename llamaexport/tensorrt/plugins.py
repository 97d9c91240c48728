"""The RoPE/SwiGLU plugin library (plugins/, C++/CUDA): finding it, loading it into a TensorRT of the
major it was built for, and building it with the TensorRT headers found on this machine. The ONNX
graph names our nodes by PLUGIN_NAMESPACE/PLUGIN_VERSION, so TensorRT's parser routes them here."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

from llamaexport import LlamaExportError
from llamaexport.tensorrt.api import log, one_line, said

PLUGIN_LIB = "libllamaexport_plugins.so"
PLUGIN_NAMESPACE = "llamaexport"  # the RoPE/SwiGLU nodes' plugin_namespace / plugin_version attributes name these
PLUGIN_VERSION = "1"
REPO = Path(__file__).resolve().parents[2]  # the checkout: plugins/ and build/plugins/
_loaded: dict[str, object] = {}  # plugin library path -> registry handle (loading twice is refused)
_warned = False


def find_plugin_library() -> Path | None:
    """$LLAMAEXPORT_PLUGIN_LIB, else build/plugins/ of this checkout, else next to the package."""
    env = os.environ.get("LLAMAEXPORT_PLUGIN_LIB")
    if env == "none":  # build with the ONNX function bodies (scripts/gpu_check.sh's A/B of the plugins)
        return None
    if env:
        if not Path(env).is_file():
            raise LlamaExportError(f"LLAMAEXPORT_PLUGIN_LIB={env} does not exist; build it with "
                                   "`llamaexport plugins build` or unset the variable")
        return Path(env)
    for p in (REPO / "build" / "plugins" / PLUGIN_LIB, Path(__file__).parents[1] / PLUGIN_LIB):
        if p.is_file():
            return p
    return None


def load_plugins(trt, path=None, *, required: bool = False, logger=None) -> str | None:
    """Register our plugin creators in TensorRT's global registry (once per process; TensorRT
    refuses a second load). Returns the library path, or None (after one warning) without one."""
    global _warned
    reg = trt.get_plugin_registry()
    path = path or find_plugin_library()
    if reg.get_creator("RoPE", PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:  # already loaded (by us or others)
        return str(path) if path else next(iter(_loaded), "registered")
    if path is None:
        if required:
            raise LlamaExportError(f"this engine uses the llamaexport plugins but {PLUGIN_LIB} was not found; build it "
                                   "with `llamaexport plugins build` or set LLAMAEXPORT_PLUGIN_LIB")
        if not _warned:
            log(f"warning: {PLUGIN_LIB} not found (`llamaexport plugins build`, or set LLAMAEXPORT_PLUGIN_LIB); "
                "TensorRT will run the ONNX function bodies of RoPE and SwiGLU instead of the plugins")
            _warned = True
        return None
    check_plugin_library(path, trt.__version__)  # before TensorRT calls into it through its vtables
    handle = reg.load_library(str(path))
    if handle is None:
        raise LlamaExportError(f"TensorRT {trt.__version__} refused the plugin library {path}"
                               f"{said(logger and logger.last_error)}; rebuild it with `llamaexport plugins build`")
    _loaded[str(path)] = handle
    return str(path)


def plugin_library_trt_version(path) -> tuple[int, int] | None:
    """(major, minor) of the TensorRT headers the plugin library at `path` was compiled against, read
    with ctypes from its exported llamaexport_plugins_trt_major/_minor (plugins/plugin_api.cpp); None
    for a library that does not export them (built before they existed)."""
    try:
        lib = ctypes.CDLL(str(path))  # the library links no libnvinfer: it loads without TensorRT
    except OSError as e:
        raise LlamaExportError(f"cannot load the plugin library {path} ({e}); rebuild it with "
                               "`llamaexport plugins build`") from None
    try:
        major, minor = lib.llamaexport_plugins_trt_major, lib.llamaexport_plugins_trt_minor
    except AttributeError:
        return None
    major.restype = minor.restype = ctypes.c_int32
    major.argtypes = minor.argtypes = []
    return int(major()), int(minor())


def check_plugin_library(path, trt_version: str) -> tuple[int, int]:
    """Refuse (one line naming both versions) a plugin library built against another TensorRT major
    than `trt_version`, the running one: the logger interfaces changed in 11.0 (see plugin_api.cpp),
    so such a library would call TensorRT's logger through the wrong vtable slot. Returns the
    library's (major, minor)."""
    built = plugin_library_trt_version(path)
    if built is None:
        raise LlamaExportError(f"the plugin library {path} does not say which TensorRT it was built for (an older "
                               f"build); rebuild it for this TensorRT {trt_version} with `llamaexport plugins build`")
    running = int(str(trt_version).split(".")[0])
    if built[0] != running:
        raise LlamaExportError(f"the plugin library {path} was built against TensorRT {built[0]}.{built[1]} headers "
                               f"but this is TensorRT {trt_version}: a plugin library loads only into the TensorRT "
                               f"major it was built for; rebuild it with `llamaexport plugins build` and the "
                               f"TensorRT {running}.x headers")
    return built



def registered_creators(trt) -> dict[str, bool]:
    reg = trt.get_plugin_registry()
    return {n: reg.get_creator(n, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None for n in ("RoPE", "SwiGLU")}



def gpu_archs() -> str | None:
    """This machine's GPU architectures ("89", "80;90"), from nvidia-smi; None if unknown."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    r = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
    caps = sorted({c.strip().replace(".", "") for c in r.stdout.split()} if r.returncode == 0 else set())
    return ";".join(caps) if caps and all(c.isdigit() for c in caps) else None


SYSTEM_TRT_INCLUDE_DIRS = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include")


def tensorrt_header_version(include_dir) -> tuple[int, int, int]:
    """(major, minor, patch) of the TensorRT headers in `include_dir`, from its NvInferVersion.h.
    10.0-10.14 define the numbers (`#define NV_TENSORRT_MAJOR 10`); 10.15, 10.16 and 11.x define
    them through another macro (`#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE` after
    `#define TRT_MAJOR_ENTERPRISE 11`: include/NvInferVersion.h, NVIDIA/TensorRT release/10.16, 11.1)."""
    f = Path(include_dir) / "NvInferVersion.h"
    try:
        text = f.read_text(errors="replace")
    except OSError as e:
        raise LlamaExportError(f"cannot read {f} ({e.strerror}): these are not complete TensorRT headers; pass "
                               "--tensorrt-root with a TensorRT install") from None
    defines = dict(re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\w+)", text, re.MULTILINE))

    def value(name: str, hops: int = 0) -> int | None:
        v = defines.get(name)
        if v is None or hops > 4:
            return None
        return int(v) if v.isdigit() else value(v, hops + 1)

    parts = [value(f"NV_TENSORRT_{p}") for p in ("MAJOR", "MINOR", "PATCH")]
    if None in parts:
        raise LlamaExportError(f"{f} does not define NV_TENSORRT_MAJOR, _MINOR and _PATCH as numbers; pass "
                               "--tensorrt-root with a TensorRT install")
    return parts[0], parts[1], parts[2]


def find_tensorrt_headers(tensorrt_root=None) -> list[tuple[Path, tuple[int, int, int]]]:
    """Every TensorRT include directory to consider, with its version: `tensorrt_root`'s only when
    given, else $TensorRT_ROOT / $TRT_ROOT's, then the Debian/JetPack locations."""
    if tensorrt_root:
        root = Path(tensorrt_root)
        dirs = [d for d in (root / "include", root) if (d / "NvInferRuntime.h").is_file()]
        if not dirs:
            raise LlamaExportError(f"no include/NvInferRuntime.h under {root}; pass the TensorRT install prefix")
        return [(dirs[0], tensorrt_header_version(dirs[0]))]
    roots = [os.environ.get("TensorRT_ROOT"), os.environ.get("TRT_ROOT")]
    cands = [Path(r) / "include" for r in roots if r] + [Path(p) for p in SYSTEM_TRT_INCLUDE_DIRS]
    return [(c, tensorrt_header_version(c)) for c in dict.fromkeys(cands) if (c / "NvInferRuntime.h").is_file()]


def _installed_tensorrt() -> str | None:
    """The version of the tensorrt Python package here, or None without one."""
    try:
        import tensorrt
    except ImportError:
        return None
    except Exception as e:  # installed but broken (its libnvinfer missing, ...): the headers cannot be matched
        log(f"warning: the tensorrt package is installed but does not import ({type(e).__name__}: {one_line(e)})")
        return None
    return tensorrt.__version__


def select_tensorrt_headers(found: list[tuple[Path, tuple[int, int, int]]],
                            installed: str | None) -> tuple[Path, tuple[int, int, int]]:
    """The headers to build the plugin library with: the first of `found` whose major version is the
    installed tensorrt package's (a library loads only into that major: check_plugin_library), or
    the first when no package is installed. Says which it took; refuses a mismatch with one line."""
    if not found:
        raise LlamaExportError("TensorRT headers not found (the pip wheels ship none): pass --tensorrt-root with "
                               "a TensorRT tar/zip install, install libnvinfer-dev, or use --kernels-only")

    def name(v):
        return ".".join(map(str, v))

    if installed is None:
        include, version = found[0]
        log(f"TensorRT headers: {include} (TensorRT {name(version)}); no tensorrt Python package here, so the "
            f"library will load only into TensorRT {version[0]}.x")
        return include, version
    major = int(installed.split(".")[0])
    for include, version in found:
        if version[0] == major:
            log(f"TensorRT headers: {include} (TensorRT {name(version)}), for the installed tensorrt {installed}")
            return include, version
    seen = ", ".join(f"{name(v)} in {d}" for d, v in found)
    raise LlamaExportError(f"the TensorRT headers found ({seen}) do not match the installed tensorrt {installed}: "
                           f"a plugin library loads only into the TensorRT major it was built for; pass "
                           f"--tensorrt-root with TensorRT {major}.x headers (its tar/zip install, or libnvinfer-dev)")


def build_plugins(*, tensorrt_root=None, cuda_arch=None, kernels_only=False) -> Path:
    """cmake configure + build plugins/ into build/plugins; returns the library (or the build dir)."""
    src, out = REPO / "plugins", REPO / "build" / "plugins"
    if not (src / "CMakeLists.txt").is_file():
        raise LlamaExportError(f"the plugin sources are not here ({src}): llamaexport was installed without them; "
                               "clone the repository and run `llamaexport plugins build` there")
    cmake = shutil.which("cmake")
    if not cmake:
        raise LlamaExportError("cmake not found; install CMake >= 3.18 (e.g. pip install cmake)")
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)
    if not nvcc:
        raise LlamaExportError("nvcc not found; install the CUDA toolkit (>= 11.8) or set CUDACXX=/path/to/nvcc")
    args = [cmake, "-S", str(src), "-B", str(out), f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DLLAMAEXPORT_KERNELS_ONLY={'ON' if kernels_only else 'OFF'}"]
    if not kernels_only:
        include, version = select_tensorrt_headers(find_tensorrt_headers(tensorrt_root), _installed_tensorrt())
        # explicit, so a build dir configured earlier with other headers (CMake caches find_path) follows
        args.append(f"-DTensorRT_INCLUDE_DIR={include}")
    arch = (cuda_arch or "").replace(",", ";") or gpu_archs()
    if arch:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    for cmd in (args, [cmake, "--build", str(out), "-j", str(os.cpu_count() or 2)]):
        log("$ " + " ".join(cmd))
        r = subprocess.run(cmd)  # output streams to the terminal
        if r.returncode != 0:
            raise LlamaExportError(f"{' '.join(cmd[:2])} failed (exit {r.returncode}); see the cmake output above")
    if kernels_only:
        return out
    lib = out / PLUGIN_LIB
    built = plugin_library_trt_version(lib)
    if built != version[:2]:  # the compile must have used the headers chosen above
        raise LlamaExportError(f"{lib} records TensorRT {built} but was configured with the {version} headers in "
                               f"{include}; delete {out} and run `llamaexport plugins build` again")
    return lib

"""The tensorrt module, imported lazily (only NVIDIA machines have it): the import with its way-out
error, the version, the logger that remembers TensorRT's last error, and the Stage that turns a raising
binding into one error line. The builder, the plugin loader and the TensorRT backend share these."""

from __future__ import annotations

from llamaexport import LlamaExportError, log


def require_tensorrt(advice: str | None = None, *, what: str = "the engine step"):
    """Import tensorrt or fail with one line saying how to proceed without it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        advice = advice or ("add --export-only to prepare the artifact now and run `llamaexport compile DIR` "
                            "on the target")
        raise LlamaExportError(f"{what} needs TensorRT, which is not installed here (pip install tensorrt on a "
                               f"machine with an NVIDIA GPU); {advice}") from None
    return tensorrt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def version_tuple(version: str) -> tuple[int, int]:
    """"10.3" or "10.15.1.29" -> (10, 3)."""
    major, minor = str(version).split(".")[:2]
    return int(major), int(minor)


def make_logger(trt):
    """A TensorRT logger that prints warnings and errors and remembers the last of each."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.last_error = self.last_warning = None

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 1:
                self.last_error = msg
            elif level == 2:
                self.last_warning = msg
            if level <= 2:
                log(f"tensorrt: {'error' if level <= 1 else 'warning'}: {msg}")

    return Logger()


def one_line(text) -> str:
    """TensorRT's messages may span lines (the parser's "Invalid Node - ..." details); an error is one."""
    return " ".join(str(text).split())


def said(msg) -> str:
    """' (TensorRT said: ...)' for a message TensorRT logged, '' for none."""
    return f" (TensorRT said: {one_line(msg)})" if msg else ""



class Stage:
    """What the build or runtime is doing now, for the one error line when a TensorRT call raises
    (the Python bindings raise RuntimeError/TypeError where the C++ API returns null or false)."""

    def __init__(self, trt, logger):
        self.trt, self.logger, self.now = trt, logger, "starting"

    def error(self, e: Exception, advice: str) -> LlamaExportError:
        return LlamaExportError(f"TensorRT {self.trt.__version__} failed while {self.now}: {type(e).__name__}: "
                                f"{one_line(e) or 'no message'}{said(self.logger.last_error)}; {advice}")


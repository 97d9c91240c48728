"""Transparent huge pages for the weights: a few percent of decode speed on Linux, for nothing.

CPU decode streams every weight once per token, and ONNX Runtime keeps its (prepacked) weights in
malloc'ed memory. With 4 KiB pages that is one TLB entry per 4 KiB streamed; most Linux systems
ship transparent huge pages in `madvise` mode, so a process only gets 2 MiB pages where it asks.
glibc (>= 2.35) asks for every malloc'ed mapping when its `glibc.malloc.hugetlb=1` tunable is set,
and tunables are read once at process start, so the `llamaexport` commands that load a model
re-exec themselves with it (before any heavy import; the cost is a bare interpreter start). What
it gains is measured in docs/quantization.md (CPU graph notes). Library users get the same by
starting Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1. LLAMAEXPORT_HUGE_PAGES=0 turns it off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
REEXEC_MARK = "_LLAMAEXPORT_HUGE_PAGES_REEXEC"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's THP mode ('always', 'madvise', 'never'), None where there is no such file."""
    try:
        text = open(path).read()
    except OSError:
        return None
    return next((w[1:-1] for w in text.split() if w.startswith("[")), None)


def huge_page_env(environ: dict, *, system: str | None = None, libc: tuple[str, str] | None = None,
                  thp_mode: str | None = None) -> dict | None:
    """The environment to re-exec with so that malloc asks for huge pages, or None where that
    would change nothing: not Linux/glibc >= 2.35, THP off or already 'always', the tunable already
    set (by the user, or by our own re-exec), or LLAMAEXPORT_HUGE_PAGES=0."""
    if environ.get("LLAMAEXPORT_HUGE_PAGES", "1") == "0" or environ.get(REEXEC_MARK):
        return None  # opted out, or this process is the re-exec'd one (glibc's secure mode drops the tunable)
    if (system or platform.system()) != "Linux":
        return None
    name, version = libc or platform.libc_ver()
    try:
        if name != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    if (thp_mode or _thp_mode()) != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1", REEXEC_MARK: "1"}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command line (interpreter flags included) with the tunable
    set; returns (doing nothing) where huge_page_env says it would change nothing, in frozen
    executables, in setuid processes (glibc ignores the tunable there) or when exec fails."""
    if getattr(sys, "frozen", False) or os.getuid() != os.geteuid() or os.getgid() != os.getegid():
        return
    env = huge_page_env(dict(os.environ))
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError:
        return


def huge_pages_mb() -> float | None:
    """This process's anonymous memory in transparent huge pages (MB), None where unknown."""
    try:
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None

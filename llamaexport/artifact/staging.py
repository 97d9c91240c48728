"""Writing an artifact directory safely: one writer at a time, nothing half-written, nothing of the
user's lost.

`staging_dir(out, force=...)` is the only way a build writes: it takes an exclusive lock on `out`
(a `.NAME.lock` file beside it, held for the whole build), removes what earlier builds that died
left beside it (`.NAME.partial-PID` / `.NAME.old-PID` of processes that no longer run), yields a
temporary sibling directory to write into, and renames it to `out` when the build completes.
`--force` replaces only an existing llamaexport artifact (a directory whose manifest.json says
so), never another directory or a file. SIGTERM ends a build cleanly: the temporary directory
and the lock are removed before the process exits (143).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

from llamaexport import LlamaExportError, log
from llamaexport.artifact.manifest import MANIFEST


def is_artifact(path: Path) -> bool:
    """Whether `path` is a directory that a llamaexport build wrote (its manifest.json says so)."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "schema_version" in m and isinstance(m.get("model"), dict)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_up_after_dead_builds(out: Path) -> list[str]:
    """What builds of `out` killed mid-way (SIGKILL, a power cut) left beside it, of processes that no
    longer run: a `.NAME.partial-PID` is removed; a `.NAME.old-PID` (the artifact being replaced) is
    renamed back to `out` if the new one never arrived, else removed. Returns what was done."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    done = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and not out.is_symlink():
            os.replace(p, out)
            done.append(f"restored {out} from {p.name}, left by a build that did not finish")
        else:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            done.append(f"removed {p}, left by a build that did not finish")
    return done


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def target_lock(out: Path):
    """An exclusive lock on building `out`, held until the block exits. A second build of the same
    `out` is refused at once, naming the process that holds it."""
    import fcntl

    lock = lock_path(out)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LlamaExportError(f"another build (process {holder}) is writing {out}; wait for it to finish "
                                   "or choose another --out") from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def on_terminate(cleanup):
    """While the block runs, SIGTERM runs cleanup() and exits 143. The handler cleans up itself
    instead of raising into whatever runs (an exception raised from a signal handler can surface
    inside a C extension's callback and abort the process). Only where SIGTERM has its default
    action and in the main thread; elsewhere the block runs as is."""
    def handler(signum, frame):
        cleanup()
        os.write(2, b"interrupted (SIGTERM); the partial build was removed\n")
        os._exit(128 + signum)

    try:
        installed = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        if installed:
            signal.signal(signal.SIGTERM, handler)
    except (ValueError, AttributeError):  # not the main thread; no SIGTERM (Windows)
        installed = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def staging_dir(out, *, force: bool):
    """Yield a temporary sibling of `out`; on success rename it to `out`, on failure delete it.

    Nothing half-written ever appears at `out`, and `force` replaces only an existing artifact."""
    out = Path(out).expanduser().absolute()
    if out.parent == out or not out.name or out.name in (".", ".."):
        raise LlamaExportError(f"--out {out} is not a directory a build can create; name a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(out):
        for line in clean_up_after_dead_builds(out):
            log(line)
        _check_target(out, force=force)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"

        def remove_partial():
            shutil.rmtree(tmp, ignore_errors=True)
            lock_path(out).unlink(missing_ok=True)  # ours: the kernel drops the flock at exit

        with on_terminate(remove_partial):
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                yield tmp
                _check_target(out, force=force)  # again: something may have appeared at `out` meanwhile
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        _move_into_place(tmp, out)


def _move_into_place(tmp: Path, out: Path):
    """tmp -> out, replacing an artifact at out, with SIGINT and SIGTERM held off so that neither the
    finished build nor the artifact it replaces is lost between the two renames."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
    try:
        if not out.exists():
            os.replace(tmp, out)
            return
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # put the artifact back; tmp is removed below
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _check_target(out: Path, *, force: bool):
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise LlamaExportError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise LlamaExportError(f"{out} is not a directory; --force replaces only a llamaexport artifact, "
                               "so choose another --out or remove it yourself")
    if not is_artifact(out):
        raise LlamaExportError(f"{out} is not a llamaexport artifact (no manifest.json of one); --force replaces "
                               "only an artifact, so choose another --out or remove it yourself")

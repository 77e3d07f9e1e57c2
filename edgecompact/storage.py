"""Writing run files so that nothing is lost: atomic replacement, a full disk reported in one line, and one
writer at a time per run directory or latency table (a lock file holding the writer's pid and host).

A killed process, a signal or a full disk leaves the previous complete version of every file written here.
Nothing here knows what the files hold.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from edgecompact.errors import ConfigError, StorageError

# errno -> how the one-line message names it (EFBIG: a file-size limit such as RLIMIT_FSIZE / ulimit -f)
FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file size limit exceeded"}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would have given a new file (read once: os.umask can only set it)


def full_disk(e: BaseException) -> str | None:
    """How a failed write ran out of room ("no space left on device", ...), or None for any other failure.
    Looks through the exceptions chained to `e`: torch.save reports a failed write as a RuntimeError whose
    context is the OSError."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in FULL:
            return FULL[e.errno]
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def cache_root() -> Path:
    """This user's edgecompact cache (per-machine latency tables, tuning databases, decoded folders):
    $EDGECOMPACT_CACHE, else $XDG_CACHE_HOME/edgecompact, else ~/.cache/edgecompact."""
    if os.environ.get("EDGECOMPACT_CACHE"):
        return Path(os.environ["EDGECOMPACT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgecompact"


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` into a temporary file beside it, synced and renamed into place.

    Whatever happens (a signal, a crash, a full disk) `path` holds either its previous or its new complete
    contents, and the temporary file is removed. A full disk, quota or file-size limit raises StorageError
    naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide checkpoints and tables from the user's group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = full_disk(e)
        if reason is None:
            raise
        raise StorageError(f"cannot write {path}: {reason}; its last complete version is kept: free some space "
                           "and re-run the same command to resume") from None


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def read_json(path: Path) -> Any:
    """The JSON document in `path`; ConfigError naming the file when it is missing, truncated or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: truncated or not JSON ({e})") from None


def lock_path(target: Path) -> Path:
    """The lock file of a run directory or table: a hidden file beside it (`runs/.x.lock` for `runs/x`)."""
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.lock")


@contextmanager
def exclusive(target: Path, what: str, log: Callable[[str], None] | None = None, *,
              wait: bool = False) -> Iterator[None]:
    """Hold the lock of `target` (a run directory or table) while the block runs; `what` names it for the user
    (e.g. "--out runs/x"). A second process is refused in one line (StorageError) naming the holder's pid, or,
    with `wait` (a shared cache another process is filling), says once through `log` whom it waits for and
    blocks until the lock is free.

    The lock is an flock on `lock_path(target)`, which holds "pid host". The kernel drops it when its holder
    dies, so a lock left by a killed process (kill -9, power loss) is stale: it is taken over, with a message.
    """
    path = lock_path(target)
    try:
        fd = _acquire(path, what, log, wait)
    except OSError as e:
        if (reason := full_disk(e)) is not None:
            raise StorageError(f"{what}: cannot write the lock file {path}: {reason}") from None
        raise ConfigError(f"{what}: cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # removed while still locked, so a waiting process re-checks the inode
        os.close(fd)


def _acquire(path: Path, what: str, log: Callable[[str], None] | None, wait: bool = False) -> int:
    """A descriptor of the lock file `path`, flocked, holding this process's pid and host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd, default="")
            if not holder:  # it has the lock but may not have written its pid yet
                time.sleep(0.2)
                holder = _holder(fd)
            if wait:
                if log is not None:
                    log(f"{what}: another edgecompact process ({holder}) is writing it; waiting for it to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder releases (or dies)
            else:
                os.close(fd)
                raise StorageError(f"{what}: in use by another edgecompact process ({holder}; lock file {path}); "
                                   "wait for it to finish or choose another path") from None
        try:  # the holder may have released and removed the file between our open and flock: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        stale = _holder(fd, default="")
        if stale and log is not None:
            log(f"{what}: taking over a stale lock ({stale}, which no longer runs)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(fd: int, default: str = "pid unknown") -> str:
    """'pid N on HOST' from a lock file, or `default` when it is empty or unreadable."""
    try:
        pid, host = os.pread(fd, 256, 0).decode().split()
        return f"pid {int(pid)} on {host}"
    except (OSError, ValueError, UnicodeDecodeError):
        return default

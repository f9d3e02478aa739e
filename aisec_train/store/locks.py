"""Exclusive locks on a run directory or a dataset ledger: a second job waits (with a timeout) or refuses.

``fcntl.flock`` on a lock file opened with ``O_NOFOLLOW``: the kernel releases it when the holder dies (even by
SIGKILL), so there are no stale locks to clean; on Linux NFS it is emulated with POSIX byte-range locks, so it
also holds across cluster nodes that share the directory. The holder writes its pid, host, user and start
time into the lock file, so a refusal names who holds it.

    >>> with exclusive_lock(run_dir / ".aisec-train.lock", wait=30.0, what=f"run directory {run_dir}") as held:
    ...     ...   # held.token identifies this holder to processes it spawns (see ledger delegates)
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aisec_train.store.errors import IntegrityError, LockError
from aisec_train.store.files import open_in_place
from aisec_train.store.timing import span, timed

RUN_LOCK = ".aisec-train.lock"
# (st_dev, st_ino) -> thread id of each lock this process holds. The same thread asking again would wait for
# itself forever, so it is refused; another thread of this process waits on flock like any other job.
_held: dict[tuple[int, int], int] = {}


@dataclass(frozen=True)
class HeldLock:
    path: Path
    token: str


def holder(path: str | os.PathLike) -> dict:
    """What the current holder wrote into the lock file ({} when unknown)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        info = json.loads(os.read(fd, 4096) or b"{}")
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}
    finally:
        os.close(fd)


def holder_soon(path: str | os.PathLike, patience_s: float = 1.0) -> dict:
    """:func:`holder`, waiting up to ``patience_s`` for the record: a holder writes it just after taking the lock,
    so a job refused in that instant would otherwise name "another process" instead of the holder."""
    deadline = time.monotonic() + patience_s
    while not (info := holder(path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return info


def describe(info: dict) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} (user {info.get('user')}, since {info.get('since')})"


def _open(path: Path) -> int:
    """The lock file, changed in place (never renamed: the lock is on its inode), not through a symlink."""
    try:
        return open_in_place(path, root=path.parent, flags=os.O_RDWR | os.O_CREAT, perms=0o644)
    except IntegrityError as err:
        raise IntegrityError(f"lock file {err}") from None


# flock's answers for "this filesystem cannot lock" (NFSv3 without lockd, SMB, some FUSE mounts): not a holder.
NO_LOCKS = {errno.ENOLCK: "ENOLCK", errno.EOPNOTSUPP: "EOPNOTSUPP", errno.ENOSYS: "ENOSYS"}


def _try(fd: int, path: Path, what: str) -> bool:
    """Take the lock without waiting: True, or False when another process holds it. The caller closes ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in NO_LOCKS:
            raise
        # Without the lock two jobs could append to the same ledger or run directory: refuse rather than race.
        raise LockError(
            f"{what}: the filesystem holding {path} cannot take a lock (flock: {NO_LOCKS[err.errno]}, "
            f"{err.strerror}); put it on storage whose locks work (local disk, NFSv4, NFSv3 with lockd, Lustre "
            "mounted -o flock, GPFS, CephFS): privacy.ledger_store=DIR or AISEC_TRAIN_LEDGER_STORE for the ledger "
            "store, hydra.run.dir=DIR for a run directory, audit.registry_path for the registry (docs/cluster.md)"
        ) from None


@contextmanager
def exclusive_lock(
    path: str | os.PathLike, *, wait: bool | float = False, what: str | None = None
) -> Iterator[HeldLock]:
    """Hold an exclusive lock on ``path`` for the block.

    ``wait``: False refuses at once when another process holds it; True waits forever; a number waits that many
    seconds, then refuses. The refusal (LockError) names ``what`` and the holder.
    """
    path = Path(os.path.abspath(path))
    what = what or f"lock {path}"
    timeout = math.inf if wait is True else float(wait or 0.0)
    with span("lock"):
        fd, ident, token = _acquire(path, what, timeout)
    try:
        yield HeldLock(path, token)
    finally:
        with span("lock"):
            _held.pop(ident, None)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _acquire(path: Path, what: str, timeout: float) -> tuple[int, tuple[int, int], str]:
    """Lock ``path`` (waiting up to ``timeout`` seconds), write the holder's record; (fd, file identity, token)."""
    deadline = time.monotonic() + timeout
    while True:
        fd = _open(path)
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        if _held.get(ident) == threading.get_ident():
            os.close(fd)
            raise LockError(f"{what} is already locked by this thread (pid {os.getpid()}); it cannot be opened twice")
        try:
            locked = _try(fd, path, what)
        except LockError:
            os.close(fd)
            raise
        if locked:
            try:  # the file may have been replaced between open and lock: lock the one at the path
                same = os.stat(path, follow_symlinks=False).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            continue
        os.close(fd)
        if time.monotonic() >= deadline:
            waited = "" if timeout == 0 else f" after waiting {timeout:g}s"
            raise LockError(f"{what} is locked by {describe(holder_soon(path))}{waited} ({path}); one job at a time")
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    token = secrets.token_hex(16)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "what": what,
        "token": token,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[ident] = threading.get_ident()
    return fd, ident, token


@timed("lock")
def held_by(path: str | os.PathLike, token: str) -> bool:
    """Whether the lock at ``path`` is held right now by the holder that received ``token``.

    For processes a holder spawns (data-parallel ranks, federated clients): they act under their parent's lock.
    """
    path = Path(os.path.abspath(path))
    if holder(path).get("token") != token:
        return False
    fd = _open(path)
    try:
        if _try(fd, path, f"lock {path}"):  # nobody holds it: the token is left over from a holder that is gone
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def lock_run_dir(run_dir: str | os.PathLike, *, wait: bool | float = False):
    """The run directory's lock (``RUN_DIR/.aisec-train.lock``): one job per run directory."""
    return exclusive_lock(Path(run_dir) / RUN_LOCK, wait=wait, what=f"run directory {run_dir}")

"""Safe writes: inside a root directory only, never through a symlink, atomic (temp + fsync + rename + fsync dir).

Every component below ``root`` is opened relative to its parent's directory descriptor with ``O_NOFOLLOW``, so
a symlink planted anywhere under the root (``run/checkpoints -> /etc``, ``run/report.json -> ~/.bashrc``) is
refused in one line and nothing is written through it, even if it is planted while we walk. The folders above
``root`` may be symlinks (``/tmp`` on some systems): the user's choice, not something a run writes. ``root`` itself
may not be one when writing (``outputs -> /elsewhere``, a ledger store or registry folder that is a link): the
jobs' preflight refused that already, and now the ledger and registry commands refuse it too.

    >>> atomic_write(run_dir / "report.json", data, root=run_dir)
    >>> with safe_open_for_write(run_dir / "metrics.csv", root=run_dir, mode="w") as fh:
    ...     fh.write("epoch,loss\\n")

Every file the package writes goes through this module (tests/test_safe_writes.py enforces it): atomic replaces
(``atomic_write``, ``safe_open_for_write``, ``write_in``), create-once files (``create_exclusive``: the HMAC key),
files changed in place (``open_live`` for live logs and appended CSVs, ``open_in_place`` for lock files) and
``shred``. So one place owns symlink refusal, temp names, fsync and permissions.
"""

from __future__ import annotations

import atexit
import errno
import io
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from aisec_train.store import timing
from aisec_train.store.errors import IntegrityError
from aisec_train.store.timing import span, timed

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts_under(path: Path, root: Path) -> tuple[Path, list[str]]:
    """``root`` (absolute) and the components of ``path`` below it; refuses a path outside ``root``."""
    root_abs, path_abs = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    try:
        rel = path_abs.relative_to(root_abs)
    except ValueError:
        raise IntegrityError(f"{path} is outside {root_abs}; a run writes only inside its own directory") from None
    if not rel.parts:
        raise IntegrityError(f"{path} is the directory {root_abs} itself, not a file inside it")
    return root_abs, list(rel.parts)


def _open_dir(parent_fd: int, name: str, shown: Path, *, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, 0o777, dir_fd=parent_fd)
        except FileExistsError:
            pass  # created meanwhile by someone else: open (and check) it below
        return _open_dir(parent_fd, name, shown, create=False)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            kind = "a symlink" if _is_link(parent_fd, name) else "not a directory"
            raise IntegrityError(f"{shown} is {kind}; refusing to {'write' if create else 'read'} through it") from None
        raise


def _is_link(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=parent_fd).st_mode)
    except OSError:
        return False


@contextmanager
def _parent_dir(path: Path, root: Path, *, create: bool = True) -> Iterator[tuple[int, str]]:
    """A directory fd of ``path``'s parent reached without following symlinks, and ``path``'s final name."""
    root_abs, parts = _parts_under(path, root)
    if create:  # writing: a root that is itself a symlink is refused (not one further up its path)
        if root_abs.is_symlink():
            raise IntegrityError(f"{root_abs} is a symlink; refusing to write through it")
        root_abs.mkdir(parents=True, exist_ok=True)
    try:  # O_NOFOLLOW when writing: the same refusal for a link planted since the check
        fd = os.open(root_abs, (_DIR_FLAGS if create else os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise IntegrityError(f"{root_abs} is a symlink; refusing to write through it") from None
        raise
    try:
        shown = root_abs
        for name in parts[:-1]:
            shown = shown / name
            child = _open_dir(fd, name, shown, create=create)
            os.close(fd)
            fd = child
        _refuse_link_or_dir(fd, parts[-1], shown / parts[-1], "write" if create else "read")
        yield fd, parts[-1]
    finally:
        os.close(fd)


def _refuse_link_or_dir(dir_fd: int, name: str, shown: Path, verb: str) -> None:
    try:
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise IntegrityError(f"{shown} is a symlink; refusing to {verb} through it")
    if stat.S_ISDIR(mode):
        raise IntegrityError(f"{shown} is a directory; a file was expected")


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextmanager
def staged_file(
    dir_fd: int, name: str, *, mode: str = "wb", encoding: str = "utf-8", fsync: bool = True, perms: int = 0o666
):
    """A new temp file beside ``name`` in ``dir_fd``: yields (file object, temp name). On a clean exit its content
    is flushed (and fsynced) and the temp is left for the caller to rename; on an exception it is removed.
    ``perms`` is the new file's mode before the umask (``0o600`` for private keys: never a moment wider)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode {mode!r} is not allowed: 'wb' or 'w'")
    tmp = _temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perms, dir_fd=dir_fd)
    raw = open(fd, "wb")
    fh: IO = io.TextIOWrapper(raw, encoding=encoding, newline="") if mode == "w" else raw
    try:
        yield fh, tmp
        fh.flush()
        if fsync:
            os.fsync(raw.fileno())
    except BaseException:
        _unlink_quietly(dir_fd, tmp)
        raise
    finally:
        try:
            fh.close()
        except (OSError, ValueError):
            raw.close()


def replace_in(dir_fd: int, tmp: str, name: str) -> None:
    """Rename the staged temp ``tmp`` over ``name`` in the directory ``dir_fd``: the entry is replaced, never
    followed, so a symlink planted at ``name`` is itself replaced (the caller syncs the folder)."""
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def write_in(dir_fd: int, name: str, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``name`` in the directory ``dir_fd`` with ``data`` (temp + rename; the caller syncs the folder)."""
    with staged_file(dir_fd, name, fsync=fsync) as (fh, tmp):
        fh.write(data)
    try:
        replace_in(dir_fd, tmp, name)
    except BaseException:
        _unlink_quietly(dir_fd, tmp)
        raise


@contextmanager
def safe_open_for_write(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike,
    mode: str = "wb",
    encoding: str = "utf-8",
    sync_dir: bool = True,
    perms: int = 0o666,
) -> Iterator[IO]:
    """A file object whose content replaces ``path`` atomically when the block ends without an exception.

    ``sync_dir=False`` skips the folder's fsync: the rename survives a killed process but maybe not a power loss.
    """
    with span("write"), _parent_dir(Path(path), Path(root)) as (dir_fd, name):
        with staged_file(dir_fd, name, mode=mode, encoding=encoding, perms=perms) as (fh, tmp):
            yield fh
        try:
            replace_in(dir_fd, tmp, name)
        except BaseException:
            _unlink_quietly(dir_fd, tmp)
            raise
        if sync_dir:
            os.fsync(dir_fd)


def atomic_write(
    path: str | os.PathLike,
    data: bytes | str,
    *,
    root: str | os.PathLike,
    sync_dir: bool = True,
    perms: int = 0o666,
) -> None:
    """Write ``data`` to ``path`` (inside ``root``) atomically and durably, refusing symlinks on the way;
    ``perms=0o600`` for secrets (key files)."""
    with safe_open_for_write(path, root=root, mode="wb", sync_dir=sync_dir, perms=perms) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def create_exclusive(path: str | os.PathLike, data: bytes, *, root: str | os.PathLike, perms: int = 0o600) -> bool:
    """Create ``path`` (inside ``root``) holding ``data`` unless it exists; True when this call created it.

    ``data`` goes whole into a private temp (``perms`` from the start, fsynced), which is then hard-linked into
    place: the link fails when another process won the race, so racing processes all keep the first one's file
    (one HMAC key per user) and no reader ever sees half of it. On a filesystem without hard links it falls back
    to an exclusive create in place."""
    with _parent_dir(Path(path), Path(root)) as (dir_fd, name):
        with staged_file(dir_fd, name, perms=perms) as (fh, tmp):
            fh.write(data)
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            created = True
        except FileExistsError:
            created = False  # another process created it first: theirs stays
        except OSError:  # EPERM/EOPNOTSUPP: no hard links here (some FUSE and SMB mounts)
            created = _create_in_place(dir_fd, name, data, perms)
        finally:
            _unlink_quietly(dir_fd, tmp)
        if created:
            os.fsync(dir_fd)
        return created


def _create_in_place(dir_fd: int, name: str, data: bytes, perms: int) -> bool:
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perms, dir_fd=dir_fd)
    except FileExistsError:
        return False
    with open(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def open_live(
    path: str | os.PathLike, *, root: str | os.PathLike, mode: str = "a", encoding: str = "utf-8", perms: int = 0o666
) -> IO:
    """``path`` (inside ``root``) opened for writing in place, for a file read while it grows (a live log, a CSV
    appended each epoch, a subprocess's output): ``"a"``/``"ab"`` append (creating it), ``"w"``/``"wb"``
    truncate it first. Not atomic, by design; like every write here it refuses a symlink anywhere under
    ``root``. Text modes do no newline translation (``csv`` needs that). The caller closes it.

    ``"w"`` starts a new file (the old entry unlinked, then ``O_EXCL``) rather than truncating the old one in
    place: a hard link planted there would otherwise have its target truncated and overwritten."""
    if mode not in ("a", "ab", "w", "wb"):
        raise ValueError(f"mode {mode!r} is not allowed: 'a', 'ab', 'w' or 'wb'")
    append = mode[0] == "a"
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_EXCL)
    fd = open_in_place(path, root=root, flags=flags, perms=perms, fresh=not append)
    if mode.endswith("b"):
        return open(fd, mode)
    return open(fd, mode, encoding=encoding, newline="")


def open_in_place(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike,
    flags: int = os.O_RDWR | os.O_CREAT,
    perms: int = 0o666,
    fresh: bool = False,
) -> int:
    """A raw descriptor of ``path`` (inside ``root``) for a file changed in place rather than replaced: a lock
    file that carries its holder's record, a live log (:func:`open_live`). ``O_NOFOLLOW`` and ``O_CLOEXEC``
    are always added, and no component under ``root`` may be a symlink. ``fresh``: unlink the entry first."""
    path = Path(path)
    with _parent_dir(path, Path(root)) as (dir_fd, name):
        if fresh:
            _unlink_quietly(dir_fd, name)
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, perms, dir_fd=dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:  # planted after the check above
                raise IntegrityError(f"{path} is a symlink; refusing to write through it") from None
            raise


def shred(path: str | os.PathLike, *, root: str | os.PathLike) -> bool:
    """Overwrite the regular file ``path`` (inside ``root``) with random bytes in place, fsync, then unlink it;
    False when it does not exist. A symlink anywhere under ``root`` is refused: followed, it would aim the
    overwrite at its target. Best effort: copies a filesystem or a backup keeps are beyond reach."""
    path = Path(path)
    try:
        with _parent_dir(path, Path(root), create=False) as (dir_fd, name):
            # O_NONBLOCK: a FIFO planted there fails at once instead of waiting for a reader
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            with open(fd, "wb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise IntegrityError(f"{path} is not a regular file; refusing to shred it")
                fh.write(os.urandom(st.st_size))
                fh.flush()
                os.fsync(fh.fileno())
            os.unlink(name, dir_fd=dir_fd)
            os.fsync(dir_fd)
    except FileNotFoundError:
        return False
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise IntegrityError(f"{path} is a symlink; refusing to shred through it") from None
        raise
    return True


def safe_mkdir(path: str | os.PathLike, *, root: str | os.PathLike) -> Path:
    """Create ``path`` and its parents under ``root`` without following a symlink; return it."""
    path = Path(path)
    with _parent_dir(path / ".probe", Path(root)):
        pass
    return path


@contextmanager
def open_nofollow(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> Iterator[IO[bytes]]:
    """``path`` opened for reading, refusing a symlink (anywhere under ``root`` when given, else the file)."""
    path = Path(path)
    with _parent_dir(path, Path(root) if root is not None else path.parent, create=False) as (dir_fd, name):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise IntegrityError(f"{path} is a symlink; refusing to read through it") from None
            raise
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise IntegrityError(f"{path} is not a regular file")
        yield fh


@timed("read")
def read_nofollow(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> bytes:
    """The bytes of ``path``, refusing a symlink (anywhere under ``root`` when given, else the file itself)."""
    with open_nofollow(path, root=root) as fh:
        return fh.read()


@timed("validate")
def validate_output_path(path: str | os.PathLike, *, root: str | os.PathLike | None = None, what: str) -> Path:
    """Check before training that ``path`` can be written safely: not a symlink nor a directory, and (with
    ``root``) no symlink on the way. Creates missing parent directories. Returns the absolute path."""
    path = Path(os.path.abspath(path))
    root = Path(root) if root is not None else path.parent
    try:
        with _parent_dir(path, root):
            pass
    except IntegrityError as err:
        raise IntegrityError(f"{what}: {err}") from None
    except OSError as err:
        blocker = next((p for p in path.parents if os.path.lexists(p) and not os.path.isdir(p)), None)
        if blocker is not None:  # mkdir's "File exists" / "Not a directory" named a file the user never gave
            raise IntegrityError(f"{what}: {blocker} is a file, not a folder") from None
        raise IntegrityError(f"{what}: {path} cannot be written ({err.strerror})") from None
    return path


def remove_stale_temps(path: str | os.PathLike, *, root: str | os.PathLike, suffixes: tuple[str, ...] = ("",)) -> int:
    """Delete temp files a killed writer left for ``path`` (and ``path + suffix``). Call it only while holding
    the folder's lock or as its only writer: a live writer's temp file looks the same."""
    with _parent_dir(Path(path), Path(root)) as (dir_fd, name):
        return remove_stale_in(dir_fd, [name + suffix for suffix in suffixes])


def remove_stale_in(dir_fd: int, names: list[str]) -> int:
    alternatives = "|".join(re.escape(n) for n in names)
    pattern = re.compile(rf"\.(?:{alternatives})\.\d+\.[0-9a-f]{{8}}\.tmp")
    return sum(_unlink_quietly(dir_fd, entry) for entry in os.listdir(dir_fd) if pattern.fullmatch(entry))


def _unlink_quietly(dir_fd: int, name: str) -> int:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return 1
    except FileNotFoundError:
        return 0


def _append_timing_line() -> None:
    """At exit, with ``$AISEC_TRAIN_STORE_TIMING`` set: one short append per process, so lines do not interleave."""
    path = Path(os.path.abspath(os.environ[timing.ENV]))
    try:
        with open_live(path, root=path.parent, mode="a") as fh:
            fh.write(timing.exit_line() + "\n")
    except (OSError, IntegrityError):
        pass  # a measurement aid must never fail the job (a symlink there is refused, not followed)


if timing.ENABLED:
    atexit.register(_append_timing_line)

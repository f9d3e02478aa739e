"""Safe writes: inside a root directory only, never through a symlink, atomic (temp + fsync + rename + fsync dir).

Every component below ``root`` is opened relative to its parent's directory descriptor with ``O_NOFOLLOW``, so
a symlink planted anywhere under the root (``run/checkpoints -> /etc``, ``run/report.json -> ~/.bashrc``) is
refused in one line and nothing is written through it, even if it is planted while we walk. ``root`` itself
may sit behind a symlink (``/tmp`` on some systems): it is the user's choice, not something written by a run.

    >>> atomic_write(run_dir / "report.json", data, root=run_dir)
    >>> with safe_open_for_write(run_dir / "metrics.csv", root=run_dir, mode="w") as fh:
    ...     fh.write("epoch,loss\\n")
"""

from __future__ import annotations

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
    if create:
        root_abs.mkdir(parents=True, exist_ok=True)
    fd = os.open(root_abs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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


def write_in(dir_fd: int, name: str, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``name`` in the directory ``dir_fd`` with ``data`` (temp + rename; the caller syncs the folder)."""
    with staged_file(dir_fd, name, fsync=fsync) as (fh, tmp):
        fh.write(data)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces the entry, never follows it
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
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces the entry, never follows it
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

"""Keyed integrity: HMAC-SHA256 tags under a project key kept outside every run directory.

The key file holds 32 random bytes as hex. Where it lives, in order: ``$AISEC_TRAIN_KEY_FILE`` (on a cluster,
point every node at one shared secret), else ``$XDG_CONFIG_HOME/aisec-train/hmac.key``, else
``~/.config/aisec-train/hmac.key``. It is created on first use with mode 0600, and refused when it is a
symlink, not a regular file, owned by someone else, or readable/writable by group or others.

Every tag names the key that made it (a key id: the first 8 bytes of a SHA-256 of the key), so keys can rotate:
add the new key, list the old one in ``$AISEC_TRAIN_OLD_KEY_FILES`` (colon-separated, verify-only), re-tag with
``aisec-train-ledger retag`` / ``aisec-train-registry retag``, then drop the old one (docs/integrity.md).

    >>> t = tag(b"payload", "ledger")          # 'v1:<key id>:<hex>'
    >>> verify(b"payload", t, "ledger", what="ledger x.json record 3")   # raises IntegrityError on mismatch
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from aisec_train.store.errors import IntegrityError
from aisec_train.store.files import create_exclusive
from aisec_train.store.timing import timed

KEY_ENV = "AISEC_TRAIN_KEY_FILE"
OLD_KEYS_ENV = "AISEC_TRAIN_OLD_KEY_FILES"
PURPOSES = ("checkpoint", "ledger", "registry")
_VERSION = "v1"
_KEY_BYTES = 32


@dataclass(frozen=True)
class Key:
    secret: bytes
    id: str
    path: Path


def key_path() -> Path:
    """The current key file (see the module docstring for the order)."""
    if os.environ.get(KEY_ENV):
        if not os.environ[KEY_ENV].strip():  # Path(" ") is a file named " " in the working directory
            raise IntegrityError(
                f"${KEY_ENV}={os.environ[KEY_ENV]!r} is not allowed: a key file path, not blank (unset it for the "
                "default key)"
            )
        if not Path(os.environ[KEY_ENV]).expanduser().is_absolute():  # another folder: a fresh key, ledgers "forged"
            raise IntegrityError(
                f"${KEY_ENV}={os.environ[KEY_ENV]!r} is not allowed: an absolute path (or ~/...); a relative one "
                "follows the working directory, so a run from another folder would create and use a fresh key"
            )
        return Path(os.environ[KEY_ENV]).expanduser().absolute()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return (config / "aisec-train" / "hmac.key").absolute()


def old_key_paths() -> list[Path]:
    return [Path(p).expanduser().absolute() for p in os.environ.get(OLD_KEYS_ENV, "").split(":") if p]


def key_id(secret: bytes) -> str:
    return hashlib.sha256(b"aisec-train key id\0" + secret).hexdigest()[:16]


def _create(path: Path) -> None:
    """A fresh key, created once through the store's exclusive create (private temp, fsync, link into place):
    when two processes race, the second link fails and both use the first key; no reader sees half a key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    create_exclusive(path, secrets.token_bytes(_KEY_BYTES).hex().encode() + b"\n", root=path.parent, perms=0o600)


def _read(path: Path, *, create: bool) -> Key:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if not create:
            raise IntegrityError(f"key file {path} does not exist") from None
        try:
            _create(path)
        except OSError as err:
            raise IntegrityError(
                f"key file {path} cannot be created ({err.strerror}); set ${KEY_ENV} to a private, writable path"
            ) from None
        return _read(path, create=False)
    except OSError as err:  # ELOOP: the key file is a symlink
        raise IntegrityError(
            f"key file {path} cannot be opened safely ({err.strerror}); it must not be a symlink"
        ) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise IntegrityError(
                f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; only its owner may access it (chmod 600)"
            )
        if st.st_uid != os.geteuid():
            raise IntegrityError(f"key file {path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()})")
        text = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < _KEY_BYTES:
        raise IntegrityError(f"key file {path} must hold at least {_KEY_BYTES} random bytes as hex")
    return Key(secret, key_id(secret), path)


_cache: dict[tuple, Key] = {}


def _cached(path: Path, *, create: bool) -> Key:
    try:
        st = os.lstat(path)
        stamp = (str(path), st.st_ino, st.st_mtime_ns, st.st_mode, st.st_uid)
    except FileNotFoundError:
        stamp = None
    if stamp is not None and stamp in _cache:
        return _cache[stamp]
    key = _read(path, create=create)
    st = os.lstat(path)
    _cache[(str(path), st.st_ino, st.st_mtime_ns, st.st_mode, st.st_uid)] = key
    return key


def current_key() -> Key:
    """The signing key, created on first use."""
    return _cached(key_path(), create=True)


def existing_key() -> Key:
    """The signing key, which must already exist (IntegrityError otherwise): for tools that only read or amend what
    a job tagged, where a fresh key would tag nothing they could verify."""
    return _cached(key_path(), create=False)


def verify_keys() -> dict[str, Key]:
    """Every key a tag may verify under: the current one and the verify-only old ones, by key id."""
    keys = {}
    for path in old_key_paths():
        try:
            key = _cached(path, create=False)
        except IntegrityError as err:
            raise IntegrityError(f"${OLD_KEYS_ENV}: {err}") from None
        keys[key.id] = key
    cur = current_key()
    keys[cur.id] = cur
    return keys


def _mac(secret: bytes, data: bytes, purpose: str) -> str:
    if purpose not in PURPOSES:
        raise ValueError(f"tag purpose {purpose!r} is not one of {PURPOSES}")
    return hmac.new(secret, b"aisec-train\0" + purpose.encode() + b"\0" + data, hashlib.sha256).hexdigest()


@timed("tag")
def tag(data: bytes, purpose: str) -> str:
    """``v1:<key id>:<HMAC-SHA256 hex>`` of ``data`` for ``purpose`` under the current key."""
    key = current_key()
    return f"{_VERSION}:{key.id}:{_mac(key.secret, data, purpose)}"


def tag_key_id(tag_: object) -> str | None:
    parts = tag_.split(":") if isinstance(tag_, str) else []
    return parts[1] if len(parts) == 3 and parts[0] == _VERSION else None


@timed("verify")
def verify(data: bytes, tag_: object, purpose: str, *, what: str) -> None:
    """Raise IntegrityError (naming ``what``) unless ``tag_`` is a valid tag of ``data`` for ``purpose``."""
    kid = tag_key_id(tag_)
    if kid is None:
        raise IntegrityError(f"{what} has no valid keyed tag ({str(tag_)[:40]!r}); refusing an unverified record")
    keys = verify_keys()
    if kid not in keys:
        raise IntegrityError(
            f"{what} is tagged under key {kid}, which is neither the current key {current_key().id} ({key_path()}) "
            f"nor listed in ${OLD_KEYS_ENV}; refusing"
        )
    if not hmac.compare_digest(str(tag_).split(":")[2], _mac(keys[kid].secret, data, purpose)):
        raise IntegrityError(f"{what}: keyed tag does not verify (edited or forged); refusing")


def is_current(tag_: object) -> bool:
    """Whether ``tag_`` was made by the current key (False: re-tag it before the old key is dropped)."""
    return tag_key_id(tag_) == current_key().id

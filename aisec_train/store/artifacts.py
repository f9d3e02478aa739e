"""A file and its keyed tag, committed together so that a kill at any instant leaves a loadable state.

``NAME`` stays a plain file (``model.pt`` is an ordinary torch file); its manifest ``NAME.tag`` is the authority:
a JSON record of the accepted SHA-256 digest(s) and metadata, HMAC-tagged under the project key. ``NAME.sha256``
(``sha256sum -c`` format) is written last as a convenience for people and is never trusted by a loader.

The commit is three renames, each atomic, in an order where every intermediate state verifies:

1. manifest := accept {new, old}   (the file on disk is still the old one, which stays accepted)
2. NAME := new payload             (now the new one, also accepted)
3. manifest := accept {new}        (and the plain ``NAME.sha256``)

A reader reads the manifest first, then the file once into memory, and checks that exact byte string.

    >>> digest = save_artifact(run / "model.pt", lambda fh: fh.write(b"..."), root=run, meta={"finite": True})
    >>> data, manifest = read_artifact(run / "model.pt", root=run)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from aisec_train.store import keys
from aisec_train.store.errors import IntegrityError
from aisec_train.store.files import (
    _parent_dir,
    atomic_write,
    open_nofollow,
    read_nofollow,
    remove_stale_in,
    replace_in,
    staged_file,
    write_in,
)
from aisec_train.store.timing import span, timed

FORMAT = "aisec-train-artifact/1"
_HEX = set("0123456789abcdef")


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".tag")


def plain_hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def canonical(obj: Any) -> bytes:
    """The bytes a tag covers: sorted keys, no whitespace, finite numbers only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _manifest(name: str, digest: str, accept: list[str], meta: dict[str, Any]) -> bytes:
    body = {"format": FORMAT, "name": name, "sha256": digest, "accept": accept, "meta": meta}
    body["tag"] = keys.tag(canonical(body), "checkpoint")
    return json.dumps(body, indent=1, sort_keys=True).encode()


def read_manifest(path: Path, *, root: Path | None = None) -> dict[str, Any]:
    """The verified manifest of ``path`` (IntegrityError when missing, malformed, forged or for another file)."""
    mpath = manifest_path(path)
    try:
        raw = read_nofollow(mpath, root=root)
    except FileNotFoundError:
        if not os.path.lexists(path):
            raise  # neither the file nor its tag: nothing was ever committed here
        raise IntegrityError(f"{path} has no keyed tag {mpath.name}; refusing an unverified artifact") from None
    except OSError as err:
        raise IntegrityError(f"{mpath} cannot be read ({err.strerror})") from None
    try:
        body = json.loads(raw)
        ok = isinstance(body, dict) and body.get("format") == FORMAT
        ok = ok and all(is_sha256(d) for d in body["accept"]) and is_sha256(body["sha256"])
        ok = ok and isinstance(body["meta"], dict) and isinstance(body["accept"], list)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise IntegrityError(f"{mpath} is not a valid {FORMAT} manifest; refusing")
    unsigned = {k: v for k, v in body.items() if k != "tag"}
    keys.verify(canonical(unsigned), body.get("tag"), "checkpoint", what=f"{mpath}")
    if body["name"] != path.name:
        raise IntegrityError(f"{mpath} vouches for {body['name']!r}, not {path.name!r}; refusing a swapped tag")
    return body


@timed("artifact.read")
def read_artifact(path: Path, *, root: Path | None = None) -> tuple[bytes, dict[str, Any]]:
    """The bytes of ``path`` once its keyed manifest verifies and their SHA-256 is one it accepts."""
    path = Path(path)
    manifest = read_manifest(path, root=root)
    try:
        data = read_nofollow(path, root=root)
    except FileNotFoundError:
        raise IntegrityError(f"{path} does not exist (its tag {manifest_path(path).name} does)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest not in manifest["accept"]:
        raise IntegrityError(
            f"{path} has SHA-256 {digest}, its keyed tag accepts {manifest['sha256']}: refusing a tampered file"
        )
    return data, {**manifest, "sha256": digest}


@timed("artifact.verify")
def verified_digest(path: Path, *, root: Path | None = None) -> tuple[str, dict[str, Any]]:
    """(SHA-256, manifest) of ``path`` after verification, streaming the file (no copy in memory)."""
    path = Path(path)
    manifest = read_manifest(path, root=root)
    h = hashlib.sha256()
    try:
        with open_nofollow(path, root=root) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise IntegrityError(f"{path} does not exist (its tag {manifest_path(path).name} does)") from None
    digest = h.hexdigest()
    if digest not in manifest["accept"]:
        raise IntegrityError(
            f"{path} has SHA-256 {digest}, its keyed tag accepts {manifest['sha256']}: refusing a tampered file"
        )
    return digest, manifest


def _current(path: Path, root: Path) -> str | None:
    """The digest of the file on disk if its manifest accepts it (a forged state is never carried forward)."""
    try:
        return verified_digest(path, root=root)[0]
    except (IntegrityError, OSError):
        return None


def save_steps(
    path: Path, write: Callable[[IO[bytes]], None], *, root: Path, meta: dict[str, Any] | None = None
) -> Iterator[str]:
    """The commit, one step per ``yield`` (tests stop it between steps to simulate a kill at that instant).

    Yields the name of the step just completed; the generator's return value is the new SHA-256. Four fsyncs:
    the payload, the pending manifest, the folder (making both renames durable together), the final manifest;
    the plain ``.sha256`` is informational and is not synced.
    """
    meta = dict(meta or {})
    mname, hname = manifest_path(path).name, plain_hash_path(path).name
    old = _current(path, root)
    with _parent_dir(path, root) as (dir_fd, name):
        remove_stale_in(dir_fd, [name, mname, hname])  # what a killed writer left
        with staged_file(dir_fd, name) as (fh, tmp), span("payload"):  # the content itself: not integrity
            write(fh)
        committed = False
        try:
            with open(os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd), "rb") as staged:
                digest = hashlib.file_digest(staged, "sha256").hexdigest()
            yield "staged"
            accept = [digest] + ([old] if old not in (None, digest) else [])
            write_in(dir_fd, mname, _manifest(name, digest, accept, meta))
            yield "manifest-pending"  # accepts the file on disk now (old) and the one about to replace it (new)
            replace_in(dir_fd, tmp, name)
            committed = True
            os.fsync(dir_fd)
            yield "payload"
            if len(accept) > 1:
                write_in(dir_fd, mname, _manifest(name, digest, [digest], meta))
            yield "manifest"
            write_in(dir_fd, hname, f"{digest}  {name}\n".encode(), fsync=False)
            yield "sha256"
        finally:
            if not committed:
                os.unlink(tmp, dir_fd=dir_fd)
    return digest


@timed("artifact.save")
def save_artifact(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], None],
    *,
    root: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
) -> str:
    """Commit ``path`` (content produced by ``write(fh)``) with its keyed manifest; return its SHA-256.

    ``root`` (default: the parent folder) bounds the no-symlink walk; ``meta`` is tagged with the digest.
    """
    path = Path(os.path.abspath(path))
    if root is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    steps = save_steps(path, write, root=Path(root) if root is not None else path.parent, meta=meta)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def retag_artifact(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> bool:
    """Re-tag ``path``'s manifest with the current key after verifying it (under an old key); True if rewritten."""
    path = Path(os.path.abspath(path))
    root = Path(root) if root is not None else path.parent
    digest, manifest = verified_digest(path, root=root)
    if keys.is_current(manifest["tag"]):
        return False
    atomic_write(manifest_path(path), _manifest(path.name, digest, [digest], manifest["meta"]), root=root)
    return True

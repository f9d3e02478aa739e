"""Checkpoints committed with a keyed tag, verified before they are loaded, and never a carrier for code.

``NAME`` is an ordinary torch file (``torch.load`` it yourself if you like); ``NAME.tag`` is its keyed manifest
(HMAC-SHA256 under the project key, see aisec_train/store) and ``NAME.sha256`` a plain ``sha256sum`` line for
people. The two are committed so that a kill at any instant leaves the old or the new checkpoint, both loadable
(aisec_train/store/artifacts.py). ``load`` reads the manifest first, verifies its tag, reads the file once, checks
that byte string's SHA-256, then unpickles it with ``weights_only=True`` (tensors and plain containers only).

    >>> digest = save({"model": model.state_dict(), "epoch": 3}, run_dir / "checkpoints" / "last.pt", root=run_dir)
    >>> payload = load(run_dir / "checkpoints" / "last.pt", root=run_dir)
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aisec_train.hashing import sha256_bytes, sha256_file  # noqa: F401 - sha256_file re-exported for callers
from aisec_train.store import artifacts
from aisec_train.store.errors import IntegrityError
from aisec_train.store.files import read_nofollow


class CheckpointError(IntegrityError, RuntimeError):
    """A checkpoint that is missing, tampered with, unverified or unreadable (a refusal: one line, exit 2)."""


@contextmanager
def _refusing(path: Path, *, reading: bool = True) -> Iterator[None]:
    """The one translation into ``CheckpointError`` naming ``path``: the store's refusals always; when ``reading``,
    a missing or unreadable file too. A write's ``OSError`` (a full disk, a read-only folder) stays an ``OSError``:
    it is the environment's, and the CLI answers it as one (``cli.refuse_write``)."""
    try:
        yield
    except IntegrityError as err:
        raise CheckpointError(str(err)) from None
    except FileNotFoundError:
        if not reading:
            raise
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as err:
        if not reading:
            raise
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.strerror})") from None


def hash_path(path: Path) -> Path:
    """The plain ``sha256sum`` sidecar (informational; loaders trust the keyed manifest, ``NAME.tag``)."""
    return artifacts.plain_hash_path(Path(path))


def all_finite(payload: Any) -> bool:
    """Whether every floating-point tensor in ``payload`` (nested dicts, lists, tuples) is finite."""
    import torch

    if isinstance(payload, torch.Tensor):
        return not payload.is_floating_point() or bool(torch.isfinite(payload).all())
    if isinstance(payload, dict):
        return all(all_finite(v) for v in payload.values())
    if isinstance(payload, list | tuple):
        return all(all_finite(v) for v in payload)
    return True


def _serialized(payload: dict[str, Any]) -> bytes:
    """torch.save into memory: a full disk then fails in our own write with OSError(ENOSPC), which the CLI answers
    in one line, instead of inside torch's zip writer as a RuntimeError ('unexpected pos ...')."""
    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save(payload: dict[str, Any], path: Path, *, root: Path | None = None, meta: dict[str, Any] | None = None) -> str:
    """Commit ``payload`` to ``path`` with its keyed tag; return its SHA-256.

    ``root`` (default: ``path``'s folder) bounds the no-symlink walk: pass the run directory. The manifest records
    whether every floating tensor is finite, so the registry can refuse a broken model without loading it, and
    ``meta`` (JSON values), tagged with it: ``model.pt`` records how to rebuild its model (``aisec-train-monitor``
    builds what the keyed tag says, never what an editable config file says).
    """
    with _refusing(path, reading=False):
        return artifacts.save_artifact(
            path,
            lambda fh: fh.write(_serialized(payload)),
            root=root,
            meta={**(meta or {}), "finite": all_finite(payload)},
        )


def manifest(path: Path, *, root: Path | None = None) -> dict[str, Any]:
    """The verified manifest of ``path`` (``sha256`` of the file on disk, ``meta``: ``finite``)."""
    with _refusing(path):
        digest, body = artifacts.verified_digest(Path(path), root=root)
    return {**body, "sha256": digest}


def recorded_hash(path: Path, *, root: Path | None = None) -> str:
    """The SHA-256 of ``path``, once its keyed tag verifies and accepts it."""
    return manifest(path, root=root)["sha256"]


def _read(path: Path, expected_sha256: str | None, root: Path | None) -> bytes:
    with _refusing(path):
        if expected_sha256 is None:  # the keyed manifest vouches for the bytes
            return artifacts.read_artifact(path, root=root)[0]
        data = read_nofollow(path, root=root)  # the caller vouches (e.g. a keyed registry entry)
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} has SHA-256 {actual}, expected {expected_sha256}: refusing a tampered checkpoint"
        )
    return data


def load(path: Path, expected_sha256: str | None = None, *, root: Path | None = None) -> dict[str, Any]:
    """Verify ``path`` (its keyed tag, or ``expected_sha256`` from a trusted record), then load it safely."""
    return _unpickle(path, _read(Path(path), expected_sha256, root))


def read_verified(path: Path, *, root: Path | None = None) -> bytes:
    """The bytes of ``path`` once its keyed tag verifies them: parse and hash these, not the path again."""
    return _read(Path(path), None, root)


def load_with_manifest(path: Path, *, root: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload, verified manifest) from one read: the manifest's ``meta`` vouches for exactly these bytes."""
    with _refusing(path):
        data, body = artifacts.read_artifact(Path(path), root=root)
    return _unpickle(path, data), body


def _unpickle(path: Path, data: bytes) -> Any:
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a refusal, reported in one line
        raise CheckpointError(f"checkpoint {path} could not be loaded safely: {' '.join(str(err).split())}") from err


def retag(path: Path, *, root: Path | None = None) -> bool:
    """Re-tag ``path`` under the current key (after verifying it under an old one); True if it was rewritten."""
    with _refusing(path, reading=False):
        return artifacts.retag_artifact(path, root=root)

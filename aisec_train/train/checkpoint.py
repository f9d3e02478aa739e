"""Checkpoints written atomically, hashed, and verified before they are loaded.

``save`` writes to a temporary file in the same folder and renames it into place, so a crash never
leaves a half-written checkpoint; the SHA-256 goes to ``NAME.sha256`` beside it. ``load`` refuses a
file whose hash differs, then unpickles with ``weights_only=True`` (tensors and plain containers only).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from aisec_train.hashing import sha256_file


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, tampered with or unreadable."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(payload: dict[str, Any], path: Path) -> str:
    """Write ``payload`` atomically; return its SHA-256 (also written to ``path.sha256``)."""
    _atomic_write(path, lambda fh: torch.save(payload, fh))
    digest = sha256_file(path)
    _atomic_write(hash_path(path), lambda fh: fh.write(f"{digest}  {path.name}\n".encode()))
    return digest


def hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def recorded_hash(path: Path) -> str:
    try:
        return hash_path(path).read_text().split()[0]
    except (OSError, IndexError) as err:
        raise CheckpointError(
            f"{path} has no readable {hash_path(path).name}; refusing an unverified checkpoint"
        ) from err


def load(path: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Verify ``path`` against ``expected_sha256`` (default: its recorded hash), then load it safely."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    expected = expected_sha256 or recorded_hash(path)
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} has SHA-256 {actual}, expected {expected}: refusing a tampered checkpoint"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a refusal, reported in one line
        raise CheckpointError(f"checkpoint {path} could not be loaded safely: {err}") from err

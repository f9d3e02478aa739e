"""SHA-256 of bytes and files: the one hashing helper of data manifests, checkpoints and the registry.

Kept free of heavy imports so the registry command can verify a checkpoint without loading torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensor: Any) -> bytes:
    """A torch tensor's raw bytes in C order, read on the CPU: what the weights digests hash. Flat first: a 0-dim
    tensor (BatchNorm's ``num_batches_tracked``) has no byte view of its own, and the bytes are the same."""
    import torch  # here, not above: the registry command verifies checkpoints without loading torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""The data manifest: a SHA-256 per array and per file read, streamed, and one hash over the manifest.

Files are hashed in 1 MiB chunks (never held whole); arrays by their dtype, shape and bytes. A user's dataset
object with neither files nor arrays is hashed item by item as it streams (``items``), so any change to what
training would read changes the manifest hash. ``dataset.sha256`` pins that hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from aisec_train.hashing import sha256_bytes, sha256_file


def sha256_array(arr: np.ndarray) -> str:
    # dtype and shape are part of the identity: the same bytes read as another layout are other data.
    header = f"{arr.dtype.str}{arr.shape}".encode()
    return sha256_bytes(header + np.ascontiguousarray(arr).tobytes())


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True).encode())


def sha256_items(dataset: Dataset, batch_size: int = 256, records: bytearray | None = None) -> str:
    """One SHA-256 over every (image, label) the dataset yields, in index order, streamed; with ``records``, each
    item's record digest is appended to it in the same pass (the data is read once)."""
    from aisec_train.data.records import digest_batch
    from aisec_train.data.views import make_loader

    digest = hashlib.sha256()
    for x, y in make_loader(dataset, batch_size=batch_size):
        for image, label in zip(x, torch.as_tensor(y).tolist(), strict=True):
            # Each item framed by its dtype, shape and a fixed-width label: unframed, the same bytes under another
            # shape, or labels 1, 23 against 12, 3 with shifted pixel bytes, gave other data the same hash.
            digest.update(f"{image.dtype}{tuple(image.shape)}".encode() + int(label).to_bytes(8, "little", signed=True))
            digest.update(image.contiguous().numpy().tobytes())
        if records is not None:
            records += digest_batch(x, y)
    return digest.hexdigest()


def _name(path: Path, root: Path | None) -> str:
    try:
        return str(path.relative_to(root)) if root is not None else path.name
    except ValueError:
        return path.name


def build_manifest(
    source: str,
    *,
    arrays: dict[str, np.ndarray],
    files: list[Path],
    root: Path | None,
    streamed: dict[str, Dataset],
    hashed: dict[Path, str] | None = None,
    records: bytearray | None = None,
) -> dict[str, Any]:
    """``hashed``: file hashes already taken (an image folder read once for its record digests); ``records``:
    collects the record digests of ``streamed["train"]`` while it streams."""
    hashed = hashed or {}
    manifest: dict[str, Any] = {
        "source": source,
        "arrays": {k: sha256_array(v) for k, v in arrays.items()},
        "files": {_name(p, root): hashed.get(p) or sha256_file(p) for p in files},
    }
    if streamed:
        manifest["items"] = {k: sha256_items(v, records=records if k == "train" else None) for k, v in streamed.items()}
    return manifest


def summary(manifest: dict[str, Any], listed: int = 100) -> dict[str, Any]:
    """The manifest for report.json: whole when small, else counts (the full one goes to data_manifest.json)."""
    if len(manifest["files"]) <= listed:
        return manifest
    return {k: v for k, v in manifest.items() if k != "files"} | {"n_files": len(manifest["files"])}

"""Turn raw arrays into verified, split, float NCHW tensors with a manifest and a lineage log.

>>> data = load_dataset(DatasetConfig(), seed=0)
>>> data.train.x.shape, data.manifest_sha256[:8]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from aisec_train.config import DatasetConfig
from aisec_train.data.sources import SOURCES, DataError, RawData
from aisec_train.hashing import sha256_bytes, sha256_file  # sha256_file is part of this module's API


@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    manifest: dict[str, Any]
    lineage: list[dict[str, Any]] = field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]

    @property
    def manifest_sha256(self) -> str:
        return sha256_json(self.manifest)

    def record(self, step: str, **details: Any) -> None:
        """Append one transform to the lineage log (later stages, such as poisoning, add theirs)."""
        self.lineage.append({"step": step, **details})


def sha256_array(arr: np.ndarray) -> str:
    # dtype and shape are part of the identity: the same bytes read as another layout are other data.
    header = f"{arr.dtype.str}{arr.shape}".encode()
    return sha256_bytes(header + np.ascontiguousarray(arr).tobytes())


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True).encode())


def to_nchw_float(x: np.ndarray, name: str) -> np.ndarray:
    """Accept N,H,W / N,H,W,C / N,C,H,W in uint8 0-255 or float 0-1; return float32 N,C,H,W."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = np.transpose(x, (0, 3, 1, 2))
    else:
        raise DataError(f"{name} has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W)")
    if x.shape[-1] != x.shape[-2]:
        raise DataError(f"{name} has non-square images {x.shape[-2]}x{x.shape[-1]}; expected HxH")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    raise DataError(f"{name} has dtype {x.dtype}; expected uint8 (0-255) or float (0-1)")


def _labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{name} holds negative label {int(y.min())}; labels must be 0..K-1")
    return y.astype(np.int64)


def build_manifest(raw: RawData) -> dict[str, Any]:
    arrays = {"x_train": raw.x_train, "y_train": raw.y_train, "x_test": raw.x_test, "y_test": raw.y_test}
    return {
        "source": raw.source,
        "arrays": {k: sha256_array(v) for k, v in arrays.items() if v is not None},
        "files": {p.name: sha256_file(p) for p in raw.files},
    }


def load_dataset(cfg: DatasetConfig, seed: int) -> Dataset:
    """Read, hash, verify, scale and split the configured dataset. Raises DataError on any refusal."""
    raw = SOURCES[cfg.name.value](cfg, seed)
    manifest = build_manifest(raw)
    digest = sha256_json(manifest)
    if cfg.sha256 and cfg.sha256.lower() != digest:
        raise DataError(
            f"data integrity check failed: manifest SHA-256 is {digest}, dataset.sha256 pins {cfg.sha256}; "
            "refusing to train on data that changed"
        )
    lineage = [{"step": "load", "source": raw.source, "manifest_sha256": digest}]

    x = to_nchw_float(raw.x_train, "x")
    y = _labels(raw.y_train, "y")
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise DataError("the training data is empty (x has 0 samples)")
    lineage.append({"step": "scale", "to": "float32 NCHW in [0, 1]", "shape": list(x.shape)})

    if raw.x_test is not None and raw.y_test is not None:
        x_test, y_test = to_nchw_float(raw.x_test, "x_test"), _labels(raw.y_test, "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"test images {x_test.shape[1:]} differ from training images {x.shape[1:]}")
        lineage.append({"step": "split", "kind": "given test split", "n_test": len(y_test)})
    else:
        stratify = y if np.bincount(y).min() >= 2 else None
        n_test, n_classes = int(np.ceil(cfg.test_fraction * len(y))), len(np.unique(y))
        if stratify is not None and not n_classes <= n_test <= len(y) - n_classes:
            raise DataError(
                f"dataset.test_fraction={cfg.test_fraction} holds out {n_test} of {len(y)} samples; a stratified "
                f"split of {n_classes} classes needs {n_classes} to {len(y) - n_classes}: change the fraction or "
                "give dataset.test_path"
            )
        x, x_test, y, y_test = train_test_split(x, y, test_size=cfg.test_fraction, random_state=seed, stratify=stratify)
        lineage.append(
            {"step": "split", "kind": "stratified hold-out", "test_fraction": cfg.test_fraction, "seed": seed}
        )

    num_classes = int(max(y.max(initial=0), y_test.max(initial=0))) + 1 if len(y) else 0
    return Dataset(
        name=cfg.name.value,
        train=Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)),
        test=Split(torch.from_numpy(np.ascontiguousarray(x_test)), torch.from_numpy(y_test)),
        num_classes=num_classes,
        manifest=manifest,
        lineage=lineage,
    )

"""In-memory image arrays as a map-style ``torch.utils.data.Dataset``, and the layout rules of array sources.

Sources that are arrays by nature (scikit-learn's digits, ``.npz`` files, MNIST idx files, CIFAR-10 batches) keep
their compact storage (uint8 stays uint8) and convert one sample at a time to float32 ``(C, H, W)`` in [0, 1], so
a 50k-image array costs its bytes once, not four times.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from aisec_train.data.errors import DataError
from aisec_train.data.items import MAX_CLASSES as MAX_LABEL


def to_nchw(x: np.ndarray, name: str) -> np.ndarray:
    """Accept N,H,W / N,H,W,C / N,C,H,W (uint8 0-255 or float 0-1); return an N,C,H,W view, dtype unchanged."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = np.transpose(x, (0, 3, 1, 2))
    else:
        raise DataError(f"{name} has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W)")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{name} has dtype {x.dtype}; expected uint8 (0-255) or float (0-1)")
    if min(x.shape[1:]) < 1:
        raise DataError(f"{name} has shape {x.shape}; every dimension must be >= 1")
    return x


def check_labels(y: np.ndarray, name: str, n: int) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) != n:
        raise DataError(f"{name} has {len(y)} labels but there are {n} images")
    if len(y) and y.min() < 0:
        raise DataError(f"{name} holds negative label {int(y.min())}; labels must be 0..K-1")
    if len(y) and int(y.max()) >= MAX_LABEL:  # before the int64 cast: uint64 labels past 2**63 wrap to negatives
        raise DataError(f"{name} holds label {int(y.max())}; labels must be class indices in [0, {MAX_LABEL})")
    return y.astype(np.int64)


class ArrayDataset(Dataset):
    """``(float32 (C, H, W) in [0, 1], int label)`` from an N,C,H,W array (uint8 or float) and its labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray, name: str = "x"):
        self.x = to_nchw(x, name)
        self.labels = check_labels(np.asarray(y), f"{name} labels", len(self.x))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.x[index]))  # a copy: read-only (memory-mapped) arrays stay untouched
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        return image, int(self.labels[index])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]


def to_nchw_float(x: np.ndarray, name: str) -> np.ndarray:
    """An N,C,H,W float32 copy in [0, 1] (uint8 is scaled by 1/255): for small arrays read whole (a trusted set,
    a monitoring batch), never for training data."""
    x = to_nchw(x, name)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)

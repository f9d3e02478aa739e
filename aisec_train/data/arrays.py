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

# Image files hold 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels: an axis of that size can hold channels.
IMAGE_CHANNELS = (1, 2, 3, 4)
_WITHOUT_ALPHA = (1, 3)


def channels_axis(shape: tuple[int, ...], name: str, channels_last: bool | None = None, setting: str = "") -> int:
    """Which axis of a 4-D ``(N, A, B, C)`` image array holds the channels: 1 (N,C,H,W) or 3 (N,H,W,C).

    ``channels_last`` True/False says it; None decides from the shape (docs/data.md, "Array layout"): the axis
    that can hold channels (size 1-4) when only one of A and C can; when both can (images at most 4 pixels on a
    side), the one of size 1 or 3 (grey, RGB) over one of size 2 or 4 (with alpha); when neither can (more than 4
    channels), N,C,H,W unless C is smaller than both A and B (then N,H,W,C is as likely). A shape those rules
    cannot decide is refused (DataError) naming the shape, both readings and ``setting``, the way to say which.
    """
    if channels_last is not None:
        return 3 if channels_last else 1
    _, a, b, c = shape
    a_can, c_can = a in IMAGE_CHANNELS, c in IMAGE_CHANNELS
    if a_can != c_can:
        return 3 if c_can else 1
    if a_can and (a in _WITHOUT_ALPHA) != (c in _WITHOUT_ALPHA):
        return 3 if c in _WITHOUT_ALPHA else 1
    if not a_can and not c < min(a, b):
        return 1
    how = (
        f"set {setting}=true (N,H,W,C) or {setting}=false (N,C,H,W)"
        if setting
        else "store it as N,H,W or in a shape whose layout is clear (docs/data.md, 'Array layout')"
    )
    raise DataError(
        f"{name} has shape {tuple(shape)}, which is ambiguous: N,C,H,W ({a} channel(s) of {b}x{c}) or N,H,W,C "
        f"({c} channel(s) of {a}x{b}); {how}"
    )


def to_nchw(
    x: np.ndarray,
    name: str,
    channels_last: bool | None = None,
    *,
    setting: str = "",
    expect: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Accept N,H,W / N,H,W,C / N,C,H,W (uint8 0-255 or float 0-1); return an N,C,H,W view, dtype unchanged.

    A 4-D array's channel axis is :func:`channels_axis`'s (``channels_last`` and ``setting`` as there); ``expect``
    (C, H, W), the shape a model was trained on, picks the reading that gives it when exactly one does; a 4-D
    shape that neither reading turns into it is refused (one line naming both readings and ``expect``)."""
    if x.ndim == 3:
        if channels_last is not None:
            raise DataError(
                f"{setting or 'channels_last'}={str(channels_last).lower()} is not allowed with {name} of shape "
                f"{x.shape}: (N,H,W) has no channel axis; leave it unset (null)"
            )
        x = x[:, None]
    elif x.ndim == 4:
        fits = [axis for axis in (1, 3) if expect is not None and _reading(x.shape, axis) == tuple(expect)]
        if expect is not None and channels_last is None and not fits:
            _, a, b, c = x.shape
            raise DataError(
                f"{name} has shape {tuple(x.shape)}: neither N,C,H,W ({a} channel(s) of {b}x{c}) nor N,H,W,C ({c} "
                f"channel(s) of {a}x{b}) gives the model's input (C, H, W) = {tuple(int(v) for v in expect)}"
            )
        axis = (
            fits[0]
            if channels_last is None and len(fits) == 1
            else channels_axis(x.shape, name, channels_last, setting)
        )
        if axis == 3:
            x = np.transpose(x, (0, 3, 1, 2))
    else:
        raise DataError(f"{name} has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W)")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{name} has dtype {x.dtype}; expected uint8 (0-255) or float (0-1)")
    if min(x.shape[1:]) < 1:
        raise DataError(f"{name} has shape {x.shape}; every dimension must be >= 1")
    return x


def _reading(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return tuple(shape[1:]) if axis == 1 else (shape[3], shape[1], shape[2])


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

    def __init__(
        self, x: np.ndarray, y: np.ndarray, name: str = "x", channels_last: bool | None = None, setting: str = ""
    ):
        self.x = to_nchw(x, name, channels_last, setting=setting)
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


def to_nchw_float(x: np.ndarray, name: str, *, expect: tuple[int, ...] | None = None) -> np.ndarray:
    """An N,C,H,W float32 copy in [0, 1] (uint8 is scaled by 1/255): for small arrays read whole (a trusted set,
    a monitoring batch), never for training data. ``expect``: the (C, H, W) the model takes (see :func:`to_nchw`)."""
    x = to_nchw(x, name, expect=expect)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)

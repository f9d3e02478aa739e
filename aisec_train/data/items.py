"""Dataset items checked at the door: what the Python API is handed is refused in one :class:`DataError` line
before anything reads it in bulk, allocates for it or trains on it.

An item is ``(image, label)``: the image a float32 tensor ``(C, H, W)`` with finite values, every item the same
shape; the label an int (or an integer 0-d tensor / numpy integer) in ``[0, MAX_CLASSES)``. Dicts, 3-tuples,
string or None labels, float64 or integer images, numpy arrays, PIL images, NaN pixels and labels such as 10^9
(which would size a 10^9-class histogram) are each named with the index of the first offender and the fix.

    >>> check_items(my_train, "train_dataset")           # DataError("train_dataset item 3: label 'cat' ...")
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from aisec_train.data.errors import DataError

MAX_CLASSES = 100_000  # more classes than any benchmark has: a larger label is a mistake, not a task
EXPECTED = "expected (float32 image tensor (C, H, W), int label)"


def check_label_range(labels: np.ndarray, key: str) -> None:
    """Refuse labels outside ``[0, MAX_CLASSES)`` before anything is sized by the largest one."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= MAX_CLASSES:
        bad = low if low < 0 else high
        raise DataError(f"{key} has label {bad}; labels must be class indices in [0, {MAX_CLASSES})")


def _label(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype is torch.bool:
            raise DataError(f"{where}: label is a {value.dtype} tensor of shape {tuple(value.shape)}; {EXPECTED}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{where}: label {value!r} ({type(value).__name__}) is not allowed; {EXPECTED}")
    label = int(value)
    if not 0 <= label < MAX_CLASSES:
        raise DataError(f"{where}: label {label} is not allowed: class indices are in [0, {MAX_CLASSES})")
    return label


def _image(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, torch.Tensor):
        fix = " (torch.from_numpy(x).float())" if isinstance(value, np.ndarray) else ""
        raise DataError(f"{where}: image is a {type(value).__name__}{fix}; {EXPECTED} (torchvision ToTensor())")
    if value.dtype is not torch.float32:
        raise DataError(f"{where}: image is a {value.dtype} tensor; {EXPECTED} (x.float(), scaled to [0, 1])")
    if value.ndim != 3 or value.numel() == 0:
        raise DataError(f"{where}: image has shape {tuple(value.shape)}; {EXPECTED}")
    if not torch.isfinite(value).all():
        raise DataError(f"{where}: image holds NaN or inf; every pixel must be finite")
    return tuple(value.shape)


def check_item(item: Any, where: str) -> tuple[tuple[int, ...], int]:
    """(image shape, label) of one item, or DataError naming what is wrong with it."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        kind = f"a {len(item)}-{type(item).__name__}" if isinstance(item, (tuple, list)) else type(item).__name__
        raise DataError(f"{where} is {kind}; {EXPECTED}")
    return _image(item[0], where), _label(item[1], where)


def check_items(dataset: Any, key: str, *, min_items: int = 1) -> tuple[tuple[int, ...], int]:
    """Every item of a map-style ``dataset`` (the API's train / test / eval set) checked, one pass; returns the
    image shape and the largest label (what the model's outputs must cover)."""
    if not isinstance(dataset, Dataset) and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataError(f"{key} is a {type(dataset).__name__}; expected a map-style torch Dataset")
    try:
        n = len(dataset)
    except Exception as err:  # noqa: BLE001 - the user's __len__ failed: name it
        raise DataError(f"{key}: len() failed ({type(err).__name__}: {err})") from None
    if n < min_items:
        raise DataError(f"{key} holds {n} item(s); at least {min_items} needed")
    shape = None
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        where = f"{key} item {i}"
        try:
            item = dataset[i]
        except Exception as err:  # noqa: BLE001 - the user's __getitem__ failed: one line naming the index
            raise DataError(
                f"{where} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
            ) from None
        found, labels[i] = check_item(item, where)
        if shape is None:
            shape = found
        elif found != shape:
            raise DataError(f"{where} has shape {found}, item 0 {shape}; every image must have the same shape")
    _check_label_attribute(dataset, key, labels)
    return shape or (), int(labels.max()) if n else -1


def _check_label_attribute(dataset: Any, key: str, labels: np.ndarray) -> None:
    """A ``labels`` / ``targets`` attribute is what splits, class counts and the model's output size are read from
    (views.labels_of); training reads the items. They must agree, or a split is stratified on other labels and a
    label past the class count fails in the middle of training."""
    from aisec_train.data.views import label_attribute

    if isinstance(dataset, (Subset, ConcatDataset)):
        return  # their labels are derived from the datasets inside, each checked where it is given
    try:
        found = label_attribute(dataset)
    except DataError as err:
        raise DataError(f"{key}: {err}") from None
    if found is None:
        if getattr(dataset, "labels", None) is None:
            try:  # read once here: views.labels_of would read every item again for them
                dataset.labels = labels
            except AttributeError:
                pass
        return
    attr, attribute = found
    differ = np.flatnonzero(attribute != labels)
    if len(differ):
        i = int(differ[0])
        raise DataError(
            f"{key}.{attr}[{i}]={int(attribute[i])} but {key} item {i} has label {int(labels[i])} "
            f"({len(differ)} of {len(labels)} differ); the {attr} attribute must list the items' labels in index order "
            "(a target_transform changes the items' labels, not the attribute)"
        )


def check_finite_split(dataset: Dataset, key: str) -> None:
    """Refuse NaN or inf anywhere in ``dataset``'s images (the test split: scores on it are reported)."""
    from aisec_train.data.views import make_loader

    offset = 0
    for x, _ in make_loader(dataset, batch_size=512):
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        if not finite.all():
            first = offset + int(torch.nonzero(~finite)[0, 0])
            raise DataError(f"{key} holds NaN or inf (first at index {first}); every pixel must be finite")
        offset += len(x)

"""Views over map-style datasets: subsets, transforms and label access, all without copying the data.

Every dataset the pipeline hands around answers :func:`labels_of` cheaply: array sources and torchvision's
``ImageFolder`` keep their labels (``labels`` / ``targets``), subsets and concatenations derive theirs. A user's
``Dataset`` without either attribute is read once to collect its labels (and the result is cached on it).

>>> train, test = split_by_labels(dataset, test_fraction=0.2, seed=0)   # stratified, by indices
>>> loader = make_loader(Transformed(train, augment), batch_size=128, shuffle=True, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, default_collate

from aisec_train.data.errors import DataError


def labels_of(dataset: Dataset) -> np.ndarray:
    """The int64 labels of ``dataset`` in index order, read without loading images where possible."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([labels_of(d) for d in dataset.datasets])
    found = label_attribute(dataset)
    if found is not None:
        return found[1]
    labels = np.asarray([int(_label(dataset[i], i)) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]
    try:
        dataset.labels = labels  # type: ignore[attr-defined]  # read once; a later call is free
    except AttributeError:
        pass
    return labels


def label_attribute(dataset: Dataset) -> tuple[str, np.ndarray] | None:
    """``(name, int64 labels)`` of the dataset's own ``labels`` or ``targets`` attribute (one label per item), or
    None. Labels that are not whole numbers are refused: cast, ``0.5`` would silently become class 0."""
    for attr in ("labels", "targets"):
        found = getattr(dataset, attr, None)
        if found is None or callable(found):
            continue
        labels = np.asarray(found)
        if labels.ndim != 1 or len(labels) != len(dataset):  # type: ignore[arg-type]
            continue
        whole = np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_
        if not whole and np.issubdtype(labels.dtype, np.floating) and len(labels):
            whole = bool(np.isfinite(labels).all() and (labels == np.round(labels)).all())
        if len(labels) and not whole:
            bad = next((v for v in labels.tolist() if not _whole(v)), labels[0])
            raise DataError(
                f"{type(dataset).__name__}.{attr} holds {bad!r} ({labels.dtype}); labels must be integer class indices"
            )
        if labels.dtype == np.uint64 and len(labels) and labels.max() > np.iinfo(np.int64).max:
            raise DataError(f"{type(dataset).__name__}.{attr} holds label {int(labels.max())}; labels must be class "
                            "indices")  # fmt: skip
        return attr, labels.astype(np.int64)
    return None


def _whole(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def _label(item, index: int) -> int:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"dataset item {index} is {type(item).__name__}; expected (image tensor, int label)")
    label = item[1]
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise DataError(f"dataset item {index} has a label tensor of shape {tuple(label.shape)}; expected an int")
        label = label.item()
    if isinstance(label, (bool, float)) or not isinstance(label, (int, np.integer)):
        raise DataError(f"dataset item {index} has label {label!r}; expected an int class index")
    return int(label)


class Transformed(Dataset):
    """``base`` with ``transform`` applied to each image (training augmentation); labels pass through."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor] | None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return (self.transform(x) if self.transform is not None else x), y

    @property
    def labels(self) -> np.ndarray:
        return labels_of(self.base)


class Relabeled(Dataset):
    """``base`` with the labels at ``indices`` replaced (mislabelled canaries, poisoned rows keep their own view)."""

    def __init__(self, base: Dataset, new_labels: dict[int, int]):
        self.base, self.new_labels = base, dict(new_labels)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.base[index]
        new = self.new_labels.get(int(index))
        if new is None:
            return x, y
        return x, (torch.as_tensor(new, dtype=y.dtype) if isinstance(y, torch.Tensor) else new)  # the base's label type

    @property
    def labels(self) -> np.ndarray:
        labels = labels_of(self.base).copy()
        for index, label in self.new_labels.items():
            labels[index] = label
        return labels


def subset(dataset: Dataset, indices: Sequence[int] | np.ndarray) -> Subset:
    return Subset(dataset, np.asarray(indices, dtype=np.int64).tolist())


def split_by_labels(dataset: Dataset, test_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """A stratified (train, held-out) split by indices, decided by the seed; refuses splits that cannot stratify."""
    from sklearn.model_selection import train_test_split

    y = labels_of(dataset)
    n_test, n_classes = int(np.ceil(test_fraction * len(y))), len(np.unique(y))
    if not 1 <= n_test < len(y):
        raise DataError(
            f"the training data has {len(y)} sample(s); dataset.test_fraction={test_fraction} must leave at least "
            "one sample on each side of the split: give more data or a test split (dataset.test_path)"
        )
    counts = np.bincount(y) if len(y) else np.zeros(0, dtype=np.int64)
    stratify = y if len(y) and counts[counts > 0].min() >= 2 else None
    if stratify is not None and not n_classes <= n_test <= len(y) - n_classes:
        raise DataError(
            f"dataset.test_fraction={test_fraction} holds out {n_test} of {len(y)} samples; a stratified split of "
            f"{n_classes} classes needs {n_classes} to {len(y) - n_classes}: change the fraction or give a test split"
        )
    train, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=stratify)
    return subset(dataset, np.sort(train)), subset(dataset, np.sort(test))


def checked_collate(batch: list) -> Any:
    """torch's default collate, with a malformed dataset refused in one line instead of a stacking traceback."""
    try:
        return default_collate(batch)
    except (RuntimeError, TypeError) as err:
        shapes = sorted({tuple(getattr(item[0], "shape", ())) for item in batch if isinstance(item, (tuple, list))})
        raise DataError(
            f"a batch could not be formed from items of shapes {shapes[:4]}: every item must be (float image tensor "
            f"of one shape, int label); set dataset.resize for image folders ({' '.join(str(err).split())[:120]})"
        ) from err


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    workers: int = 0,
    device: torch.device | None = None,
) -> DataLoader:
    """A DataLoader with the run's worker count, pinned memory on CUDA and a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
        collate_fn=checked_collate,
    )


def materialize(dataset: Dataset, limit: int | None = None, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` samples (all by default) as (x, y) tensors: for the audits' bounded samples only."""
    n = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    view = dataset if n == len(dataset) else subset(dataset, range(n))  # type: ignore[arg-type]
    xs, ys = [], []
    for x, y in make_loader(view, batch_size=batch_size):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    if not xs:
        raise DataError("cannot materialise an empty dataset")
    return torch.cat(xs), torch.cat(ys).long()


class Sample(Dataset):
    """A bounded, materialised sample ``(x, y)`` (audits, trusted sets, triggered test inputs): tensors, not a
    training split. Iterates like any map-style dataset."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]

    @property
    def labels(self) -> np.ndarray:
        return self.y.numpy()


Split = Sample  # the name the first round used for (x, y) pairs; audits and the backdoor code read it

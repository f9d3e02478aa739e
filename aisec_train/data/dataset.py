"""Read, hash, verify and split the configured data into a :class:`DataBundle` of map-style datasets.

Nothing here holds the whole dataset: sources return lazy datasets, the manifest streams over files, the split is
by indices, and augmentation is a view applied when the training loader is built.

>>> data = load_dataset(DatasetConfig(), seed=0)
>>> len(data.train), data.input_shape, data.manifest_sha256[:8]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from aisec_train.data.arrays import to_nchw_float  # noqa: F401 - part of this module's API
from aisec_train.data.config import DatasetConfig
from aisec_train.data.errors import DataError
from aisec_train.data.items import check_label_range
from aisec_train.data.manifest import build_manifest, sha256_array, sha256_json  # noqa: F401
from aisec_train.data.records import DIGEST, first_occurrences, source_digests
from aisec_train.data.sources import SOURCES, SourceData
from aisec_train.data.transforms import describe, training_transform
from aisec_train.data.views import Sample, Split, Transformed, labels_of, split_by_labels  # noqa: F401
from aisec_train.hashing import sha256_file  # noqa: F401 - part of this module's API


@dataclass
class DataBundle:
    name: str
    train: Dataset  # the training split as stored (no augmentation): what DP-SGD accounts for
    test: Dataset  # the held-out split, never augmented
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of every image
    manifest: dict[str, Any]
    train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)
    split_seed: int = 0
    record_digests: np.ndarray | None = None  # one 16-byte content digest per training record (data/records.py)
    duplicates_removed: int = 0  # exact duplicate records left out of the training split
    records_seconds: float = 0.0  # time spent computing record digests

    @property
    def manifest_sha256(self) -> str:
        return sha256_json(self.manifest)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def training_view(self, dataset: Dataset | None = None) -> Dataset:
        """``dataset`` (default: the training split) as the training loader reads it: augmented if configured."""
        base = self.train if dataset is None else dataset
        return Transformed(base, self.train_transform) if self.train_transform is not None else base

    def records_summary(self) -> dict[str, Any]:
        """For the report: how records are identified, how many distinct ones train, what hashing them cost."""
        digests = self.record_digests
        return {
            "identity": "blake2b-128 of the label and the text (NFC, white space collapsed; data/text.py)"
            if len(self.input_shape) == 1  # token ids: records are named by their text (TextDataset.digests)
            else "blake2b-128 of canonical pixels (uint8 on the 1/255 grid, else float32; C,H,W) and label",
            "n": None if digests is None else len(digests),
            "duplicates_removed": self.duplicates_removed,
            "hash_seconds": round(self.records_seconds, 6),
        }

    def record(self, step: str, **details: Any) -> None:
        """Append one transform to the lineage log (later stages, such as poisoning, add theirs)."""
        self.lineage.append({"step": step, **details})


def first_item_shape(dataset: Dataset, key: str) -> tuple[int, int, int]:
    """Check the first item is (float image tensor (C, H, W), int label) and return its shape."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"{key} is empty (0 samples)")
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], torch.Tensor):
        raise DataError(f"{key} item 0 is {type(item).__name__}; expected (image tensor (C, H, W), int label)")
    image = item[0]
    if image.ndim == 1 and not image.is_floating_point():  # text: (max_length,) token ids (data/text.py)
        return (int(image.shape[0]),)  # type: ignore[return-value]
    if image.ndim != 3 or not image.is_floating_point():
        raise DataError(
            f"{key} item 0 is a {image.dtype} tensor of shape {tuple(image.shape)}; expected float (C, H, W)"
        )
    return tuple(int(s) for s in image.shape)  # type: ignore[return-value]


def load_dataset(
    cfg: DatasetConfig,
    seed: int,
    *,
    train: Dataset | None = None,
    test: Dataset | None = None,
) -> DataBundle:
    """The configured source, or the caller's own ``train`` (and ``test``) datasets (Python API).

    Raises DataError on any refusal: unreadable data, a manifest that differs from ``dataset.sha256``, shapes
    that disagree, or a split that cannot be stratified.
    """
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    if train is not None:
        src = SourceData(train, test, source=f"python:{type(train).__name__}")
    else:
        src = SOURCES[cfg.name](cfg, split_seed)
    streamed = {}
    if not src.arrays and not src.files:
        streamed = {"train": src.train} | ({"test": src.test} if src.test is not None else {})
    started = time.perf_counter()
    digests, hashed = source_digests(src.train)
    hashed = {**src.hashed, **hashed}  # what the source hashed as it read (an .npz), then the image folders'
    records_seconds = time.perf_counter() - started
    collected = bytearray() if digests is None and streamed else None
    manifest = build_manifest(
        src.source, arrays=src.arrays, files=src.files, root=src.root, streamed=streamed, hashed=hashed,
        records=collected,
    )  # fmt: skip
    if collected is not None:
        digests = np.frombuffer(bytes(collected), dtype=DIGEST)
    digest = sha256_json(manifest)
    if cfg.sha256 and cfg.sha256.lower() != digest:
        raise DataError(
            f"data integrity check failed: manifest SHA-256 is {digest}, dataset.sha256 pins {cfg.sha256}; "
            "refusing to train on data that changed"
        )
    shape = first_item_shape(src.train, "the training data")
    lineage = [{"step": "load", "source": src.source, "manifest_sha256": digest, "shape": list(shape)}]
    for given, key in ((src.train, "the training data"), (src.test, "the test data")):
        if given is not None:  # before the split or anything else is sized by the largest label
            check_label_range(labels_of(given), key)
    if src.test is not None:
        test_shape = first_item_shape(src.test, "the test data")
        if test_shape != shape:
            raise DataError(f"test images {test_shape} differ from training images {shape}")
        train_split, test_split = src.train, src.test
        lineage.append({"step": "split", "kind": "given test split", "n_test": len(src.test)})  # type: ignore[arg-type]
    else:
        train_split, test_split = split_by_labels(src.train, cfg.test_fraction, split_seed)
        lineage.append(
            {"step": "split", "kind": "stratified hold-out", "test_fraction": cfg.test_fraction, "seed": split_seed}
        )
    train_split, train_digests, removed = _without_duplicates(train_split, digests, train_split is not src.train)
    if removed:
        lineage.append({"step": "deduplicate", "exact_duplicates_removed": removed, "identity": "record digest"})
    y_train, y_test = labels_of(train_split), labels_of(test_split)
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    num_classes = max(num_classes, len(getattr(src.train, "classes", [])))
    augment = training_transform(cfg.augment, shape)
    if augment is not None:
        lineage.append({"step": "augment", "training_only": True, "transforms": describe(cfg.augment)})
    present = int(np.bincount(y_train, minlength=num_classes).astype(bool).sum())
    if present < 2:
        raise DataError(f"the training labels hold {present} class(es); at least 2 are needed")
    return DataBundle(
        name=cfg.name if train is None else "python",
        train=train_split,
        test=test_split,
        num_classes=num_classes,
        input_shape=shape,
        manifest=manifest,
        train_transform=augment,
        lineage=lineage,
        split_seed=split_seed,
        record_digests=train_digests,
        duplicates_removed=removed,
        records_seconds=records_seconds,
    )


def _without_duplicates(
    train: Dataset, digests: np.ndarray | None, carved: bool
) -> tuple[Dataset, np.ndarray | None, int]:
    """The training split without later exact copies of a record (a duplicate would be one person's data counted
    twice, outside what the accountant bounds), its records' digests, and how many copies were left out."""
    if digests is None:
        return train, None, 0
    carved = carved and isinstance(train, Subset)  # a hold-out split: indices into the source the digests cover
    indices = np.asarray(train.indices, dtype=np.int64) if carved else np.arange(len(digests))
    base = train.dataset if carved else train
    train_digests = digests[indices]
    keep = first_occurrences(train_digests)
    if len(keep) == len(indices):
        return train, train_digests, 0
    return Subset(base, indices[keep].tolist()), train_digests[keep], len(indices) - len(keep)

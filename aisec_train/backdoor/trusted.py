"""The defender's trusted clean data, and what using it does to the run's privacy claim.

Detection thresholds, the Fine-Pruning channel ranking and pruning budget, and the fine-tuning all read a set of
samples the defender trusts to be clean. It comes from one of two places:

- ``backdoor.trusted_path=FILE.npz``: the operator's own clean set, outside the training data (same format as
  ``dataset=npz``), small enough to hold in memory (a :class:`~aisec_train.data.views.Sample`). Under DP-SGD the
  guarantee then covers every training record; the trusted set is used without DP, like public pre-training data,
  and the report says so.
- otherwise a stratified reserve of ``backdoor.clean_fraction`` carved from the training split by its labels
  (a ``Subset``: indices, no copy), before poisoning and before any federated partition (the reserve never reaches
  a client). Those records never enter DP-SGD, and the released model is fine-tuned on them without noise, so
  **they have no DP guarantee**: the report's ``privacy.scope`` and the model card name them, and the checklist
  item "defence data covered by the privacy claim" fails.

>>> trusted = load_trusted("clean.npz", data)        # or: kept, trusted = carve_reserve(data.train, 0.2, seed)
>>> privacy_scope(from_file=True, n_trusted=len(trusted), n_train=len(data.train), private=True)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset

from aisec_train.data.arrays import to_nchw_float
from aisec_train.data.dataset import DataBundle
from aisec_train.data.errors import DataError
from aisec_train.data.sources import NPZ_READ_ERRORS
from aisec_train.data.views import Sample, labels_of, subset
from aisec_train.hashing import sha256_bytes


def _subset(dataset: Dataset, rows: np.ndarray) -> Subset:
    """``rows`` of ``dataset``; a subset of a subset is flattened, so labels stay one index lookup away."""
    if isinstance(dataset, Subset):
        return subset(dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)[rows])
    return subset(dataset, rows)


def carve_reserve(train: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(rest of the training split, trusted reserve): a stratified split by label, decided by the seed."""
    y = labels_of(train)
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min(initial=0) >= 2 else None
    try:
        kept, reserved = train_test_split(np.arange(len(y)), test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as err:
        raise DataError(
            f"backdoor.clean_fraction={fraction} cannot carve a stratified reserve from {len(y)} training samples "
            f"of {len(counts)} classes ({' '.join(str(err).split())[:120]}); raise it or give backdoor.trusted_path"
        ) from err
    return _subset(train, np.sort(kept)), _subset(train, np.sort(reserved))


def load_trusted(path: str, data: DataBundle) -> Sample:
    """The operator's clean set from ``path`` (see :func:`read_trusted`, which also gives its SHA-256)."""
    return read_trusted(path, data)[0]


def read_trusted(path: str, data: DataBundle) -> tuple[Sample, str]:
    """(the operator's clean set from ``path``, checked against the training data's image shape and classes; the
    SHA-256 of exactly the bytes it was parsed from). One read: hashed again by path, a file swapped after the load
    was recorded in the lineage as the set the defence used."""
    key = f"backdoor.trusted_path={path!r}"
    if not Path(path).is_file():
        raise DataError(f"{key} does not exist or is not a file")
    try:
        raw = Path(path).read_bytes()
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:  # no pickles: loading must not run code
            x, y = archive["x"], archive["y"]
    except NPZ_READ_ERRORS as err:
        raise DataError(f"{key} is not a readable .npz holding arrays 'x' and 'y': {err}") from err
    # read in the layout that gives the model's input shape (a set in an ambiguous N,A,B,C shape, as a model trained
    # with dataset.channels_last takes it), a 4-D x that no layout turns into it refused in one line
    x = torch.from_numpy(np.ascontiguousarray(to_nchw_float(x, key, expect=tuple(data.input_shape))))
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
        raise DataError(f"{key}: y must be a 1-D integer array with one label per image")
    if tuple(x.shape[1:]) != tuple(data.input_shape):
        raise DataError(f"{key} holds images {tuple(x.shape[1:])}; the training images are {tuple(data.input_shape)}")
    if len(y) == 0 or y.min() < 0 or y.max() >= data.num_classes:
        raise DataError(f"{key}: labels must be in 0..{data.num_classes - 1}")
    return Sample(x, torch.from_numpy(y.astype(np.int64))), sha256_bytes(raw)


def privacy_scope(*, from_file: bool, n_trusted: int, n_train: int, private: bool) -> dict[str, Any]:
    """What the (epsilon, delta) claim covers once the defence has used the trusted data."""
    if not private:
        return {"covered_records": 0, "not_covered_records": 0, "statement": "no DP guarantee in this run"}
    uses = "detection reference, channel ranking, pruning budget and fine-tuning of the released model"
    if from_file:
        return {
            "covered_records": n_train,
            "not_covered_records": 0,
            "trusted_records": n_trusted,
            "statement": f"The guarantee covers all {n_train} training records. The backdoor defence also used "
            f"{n_trusted} samples of the operator's trusted clean set (backdoor.trusted_path, outside the training "
            f"data) without DP ({uses}); that set is treated as public and is not protected.",
        }
    return {
        "covered_records": n_train,
        "not_covered_records": n_trusted,
        "trusted_records": n_trusted,
        "statement": f"The guarantee covers the {n_train} records trained with DP-SGD only. {n_trusted} further "
        f"records of the supplied training data were set aside as the backdoor defence's trusted clean reserve and "
        f"used without DP ({uses}): they have NO differential-privacy guarantee. To keep every training record "
        f"covered, give the defence its own clean set with backdoor.trusted_path.",
    }

"""Sanity checks on the training split, streamed before any training.

Unusable data (NaN/inf, images of the wrong shape, a single class) raises :class:`DataError`; suspicious data
(values outside [0, 1], class imbalance, exact duplicates, outliers) becomes findings in the report, so a
reviewer sees them without the run being blocked.

Every sample is checked when the split has at most ``dataset.sanity_samples`` of them (streamed, batch by batch:
a 16-byte digest and three summary statistics per sample are all that is kept); a larger split is checked on a
seeded uniform sample of that size, and the report says which (``coverage``). Labels are always checked in full.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from aisec_train.data.errors import DataError
from aisec_train.data.views import labels_of, make_loader, subset

IMBALANCE_RATIO = 0.2  # smallest class under 20% of the largest is reported
MAX_LISTED = 10


def check_training_split(
    dataset: Dataset,
    num_classes: int,
    outlier_z: float,
    *,
    max_samples: int = 50_000,
    seed: int = 0,
    test_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Return ``{"findings": [...], "stats": {...}, "coverage": {...}}``; raise DataError on unusable data.
    ``test_labels``: the held-out split's labels, to report classes only the test split holds."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("the training split is empty")
    counts = np.bincount(labels_of(dataset), minlength=num_classes)
    if int((counts > 0).sum()) < 2:
        raise DataError(f"the training labels hold {int((counts > 0).sum())} class(es); at least 2 are needed")
    indices = np.arange(n)
    if n > max_samples:
        indices = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
    coverage = {"mode": "all" if n <= max_samples else "seeded_sample", "checked": len(indices), "of": n}
    stream = _stream(subset(dataset, indices) if n > max_samples else dataset, indices)

    findings: list[dict[str, Any]] = []
    lo, hi = float(stream["min"]), float(stream["max"])
    if lo < 0.0 or hi > 1.0:
        findings.append({"check": "value_range", "detail": f"values span [{lo:.3g}, {hi:.3g}], expected [0, 1]"})
    if counts[counts > 0].min() < IMBALANCE_RATIO * counts.max():
        findings.append({"check": "class_balance", "detail": f"class counts {counts.tolist()}"})
    findings += label_findings(counts, test_labels)
    duplicates = stream["duplicates"]
    if duplicates:
        findings.append({"check": "exact_duplicates", "count": len(duplicates), "indices": duplicates[:MAX_LISTED]})
    outliers = [int(indices[i]) for i in _outliers(stream["features"], outlier_z)]
    if outliers:
        findings.append(
            {"check": "outliers", "count": len(outliers), "indices": outliers[:MAX_LISTED], "z_threshold": outlier_z}
        )
    stats = {"value_range": [lo, hi], "class_counts": counts.tolist(), "n_duplicates": len(duplicates)}
    return {"findings": findings, "stats": stats, "coverage": coverage}


def label_findings(counts: np.ndarray, test_labels: np.ndarray | None) -> list[dict[str, Any]]:
    """The class count is the largest label + 1 (training or test), so labels {0, 1, 1000} make 1001 classes and a
    test label never trained on adds one; both can be meant (sparse ids, a class held out on purpose), so they
    are findings, not refusals: the model gets outputs that no record trains, and such test samples are always
    misclassified."""
    findings: list[dict[str, Any]] = []
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        findings.append(
            {
                "check": "classes_without_training_samples",
                "count": len(empty),
                "labels": empty[:MAX_LISTED].tolist(),
                "detail": f"num_classes={len(counts)} (largest label {len(counts) - 1}); {len(empty)} of them have no "
                "training sample: are the labels 0..num_classes-1?",
            }
        )
    if test_labels is not None:
        unseen = np.setdiff1d(np.unique(test_labels), np.flatnonzero(counts))
        if len(unseen):
            findings.append(
                {
                    "check": "test_labels_unseen_in_training",
                    "count": int(np.isin(test_labels, unseen).sum()),
                    "labels": unseen[:MAX_LISTED].tolist(),
                    "detail": f"{len(unseen)} label(s) occur only in the test split: those test samples are always "
                    "misclassified",
                }
            )
    return findings


def _stream(dataset: Dataset, indices: np.ndarray) -> dict[str, Any]:
    seen: dict[bytes, int] = {}
    duplicates: list[int] = []
    features, lo, hi, offset = [], np.inf, -np.inf, 0
    for x, _ in make_loader(dataset, batch_size=512):
        flat = x.flatten(1).double()
        finite = torch.isfinite(flat).all(dim=1)
        if not finite.all():
            bad = [int(indices[offset + i]) for i in torch.nonzero(~finite).flatten()[:MAX_LISTED].tolist()]
            raise DataError(f"training samples hold NaN or inf (first indices {bad})")
        lo, hi = min(lo, float(flat.min())), max(hi, float(flat.max()))
        features.append(torch.stack([flat.mean(1), flat.std(1, correction=0), flat.max(1).values], 1).numpy())
        for i, row in enumerate(x.flatten(1).numpy()):
            key = hashlib.sha256(row.tobytes()).digest()[:16]
            if key in seen:
                duplicates.append(int(indices[offset + i]))
            else:
                seen[key] = offset + i
        offset += len(x)
    return {"min": lo, "max": hi, "duplicates": duplicates, "features": np.concatenate(features)}


def _outliers(features: np.ndarray, z_threshold: float) -> list[int]:
    """Samples whose mean, std or max has a robust z-score (median / MAD) above the threshold."""
    median = np.median(features, axis=0)
    mad = np.median(np.abs(features - median), axis=0) * 1.4826  # consistent with the std for normal data
    # A feature that is nearly constant (e.g. every digit's max is 1.0) has a MAD near zero; a floor of
    # 2% of the [0, 1] pixel range keeps one grey level of difference from counting as an outlier.
    z = np.abs(features - median) / np.maximum(mad, 0.02)
    return np.nonzero((z > z_threshold).any(axis=1))[0].tolist()

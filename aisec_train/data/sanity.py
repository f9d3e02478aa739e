"""Sanity checks on the training split, run before any training.

Unusable data (empty, NaN/inf, a single class, labels outside 0..K-1) raises :class:`DataError`;
suspicious data (values outside [0, 1], class imbalance, exact duplicates, outliers) becomes findings
in the report, so a reviewer sees them without the run being blocked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aisec_train.data.sources import DataError

IMBALANCE_RATIO = 0.2  # smallest class under 20% of the largest is reported
MAX_LISTED = 10


def check_training_split(x: torch.Tensor, y: torch.Tensor, num_classes: int, outlier_z: float) -> dict[str, Any]:
    """Return ``{"findings": [...], "stats": {...}}``; raise DataError when the data cannot be trained on."""
    if x.ndim != 4 or len(x) == 0:
        raise DataError(f"training images must be a non-empty (N, C, H, W) array, got shape {tuple(x.shape)}")
    finite = torch.isfinite(x.flatten(1)).all(dim=1)
    if not finite.all():
        bad = torch.nonzero(~finite).flatten()[:MAX_LISTED].tolist()
        raise DataError(f"{int((~finite).sum())} training samples hold NaN or inf (first indices {bad})")
    counts = torch.bincount(y, minlength=num_classes)
    present = int((counts > 0).sum())
    if present < 2:
        raise DataError(f"the training labels hold {present} class(es); at least 2 are needed")

    findings: list[dict[str, Any]] = []
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        findings.append({"check": "value_range", "detail": f"values span [{lo:.3g}, {hi:.3g}], expected [0, 1]"})
    if counts[counts > 0].min() < IMBALANCE_RATIO * counts.max():
        findings.append({"check": "class_balance", "detail": f"class counts {counts.tolist()}"})
    duplicates = _exact_duplicates(x)
    if duplicates:
        findings.append({"check": "exact_duplicates", "count": len(duplicates), "indices": duplicates[:MAX_LISTED]})
    outliers = _outliers(x, outlier_z)
    if outliers:
        findings.append(
            {
                "check": "outliers",
                "count": len(outliers),
                "indices": outliers[:MAX_LISTED],
                "z_threshold": outlier_z,
            }
        )
    stats = {"value_range": [lo, hi], "class_counts": counts.tolist(), "n_duplicates": len(duplicates)}
    return {"findings": findings, "stats": stats}


def _exact_duplicates(x: torch.Tensor) -> list[int]:
    """Indices of samples whose bytes repeat an earlier sample."""
    seen: set[bytes] = set()
    repeated = []
    for i, row in enumerate(x.flatten(1).numpy()):
        key = row.tobytes()
        if key in seen:
            repeated.append(i)
        seen.add(key)
    return repeated


def _outliers(x: torch.Tensor, z_threshold: float) -> list[int]:
    """Samples whose mean, std or max has a robust z-score (median / MAD) above the threshold."""
    flat = x.flatten(1).numpy().astype(np.float64)
    features = np.stack([flat.mean(1), flat.std(1), flat.max(1)], axis=1)
    median = np.median(features, axis=0)
    mad = np.median(np.abs(features - median), axis=0) * 1.4826  # consistent with the std for normal data
    # A feature that is nearly constant (e.g. every digit's max is 1.0) has a MAD near zero; a floor of
    # 2% of the [0, 1] pixel range keeps one grey level of difference from counting as an outlier.
    scale = np.maximum(mad, 0.02)
    z = np.abs(features - median) / scale
    return np.nonzero((z > z_threshold).any(axis=1))[0].tolist()

"""Poison detection on activations, per (observed) class, scored against the true poisoned indices.

Both detectors split each class's training activations into "like the trusted clean data" and "not":

- spectral signatures (Tran et al. 2018): project the class's centred activations on their top singular
  vector; poisoned samples sit far out along it (cross-fitted over two halves of the class, see below).
- activation clustering (Chen et al. 2018): reduce to a few PCA components, 2-means per class; the
  poisoned samples form their own cluster.

Where the papers pick the outliers with a known poison budget (Tran: remove 1.5 x epsilon per class) or
by cluster size (Chen: the smaller cluster), both fail for all-to-one attacks at realistic rates, where the
target class is about half poison and epsilon per class is unknown. We decide with the trusted clean
reserve the defence already holds for Fine-Pruning instead (docs/backdoor.md): a spectral score is an
outlier when it lies more than ``k`` reference standard deviations from the reference scores; a cluster is
poison when the trusted samples of that class (almost) never fall in it. With fewer than 3 trusted samples
in a class the papers' own rules apply.

>>> found = spectral_signature(feats, labels, ref_feats, ref_labels, k=3.0)
>>> score(found, true_indices)  # {"precision": ..., "recall": ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import precision_score, recall_score

MIN_REFERENCE = 3
TRAN_EPSILON = 0.1  # the fallback's assumed per-class poison fraction (Tran et al. remove 1.5 x this)
CHEN_MAX_SIZE = 0.35  # the fallback's relative size below which a cluster is called poison


@dataclass
class Detection:
    method: str
    flagged: np.ndarray  # sorted indices into the analysed training split
    per_class: dict[int, int] = field(default_factory=dict)  # class -> number flagged


def score(found: Detection, true_indices: np.ndarray, n: int) -> dict[str, float | int | str]:
    """Precision and recall of the flagged set against the true poisoned indices (sklearn)."""
    truth = np.zeros(n, dtype=bool)
    truth[true_indices] = True
    pred = np.zeros(n, dtype=bool)
    pred[found.flagged] = True
    return {
        "method": found.method,
        "precision": float(precision_score(truth, pred, zero_division=0.0)),
        "recall": float(recall_score(truth, pred, zero_division=0.0)),
        "flagged": int(pred.sum()),
        "poisoned": int(truth.sum()),
    }


def _per_class(method: str, labels: np.ndarray, ref_labels: np.ndarray, decide) -> Detection:
    flagged, per_class = [], {}
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        ref_rows = np.flatnonzero(ref_labels == c)
        if len(rows) < 4:  # too few samples to call any of them outliers
            continue
        hits = rows[decide(rows, ref_rows)]
        flagged.append(hits)
        per_class[int(c)] = len(hits)
    out = np.sort(np.concatenate(flagged)) if flagged else np.zeros(0, dtype=np.int64)
    return Detection(method, out, per_class)


def spectral_signature(
    feats: np.ndarray,
    labels: np.ndarray,
    ref_feats: np.ndarray,
    ref_labels: np.ndarray,
    *,
    k: float = 3.0,
    seed: int = 0,
) -> Detection:
    """Spectral signatures, cross-fitted: each half of a class is scored on the other half's top direction.

    The top singular vector of a set of rows is the direction along which *those* rows spread most, so their
    own projections overstate the clean spread that the trusted reference measures: scored on themselves, clean
    rows of a high-dimensional class cross the reference threshold by selection alone. Fitting the direction on
    one half and scoring the other removes that bias; the poison, present in both halves, still dominates the
    direction.
    """
    rng = np.random.default_rng(seed)

    def decide(rows: np.ndarray, ref_rows: np.ndarray) -> np.ndarray:
        fold = rng.permutation(len(rows)) % 2
        hits = []
        for part in (0, 1):
            fit, scored = np.flatnonzero(fold == part), np.flatnonzero(fold != part)
            r = feats[rows[fit]]
            mu = r.mean(axis=0)
            _, _, vt = np.linalg.svd(r - mu, full_matrices=False)
            proj = (feats[rows[scored]] - mu) @ vt[0]
            if len(ref_rows) < MIN_REFERENCE:
                budget = int(1.5 * TRAN_EPSILON * len(scored))
                hits.append(scored[np.argsort(proj**2)[len(scored) - budget :]])
                continue
            ref = (ref_feats[ref_rows] - mu) @ vt[0]
            spread = max(float(ref.std(ddof=1)), 1e-6 * float(np.abs(proj).max() + 1e-12))
            hits.append(scored[np.abs(proj - ref.mean()) > k * spread])
        return np.sort(np.concatenate(hits))

    return _per_class("spectral", labels, ref_labels, decide)


def activation_clustering(
    feats: np.ndarray,
    labels: np.ndarray,
    ref_feats: np.ndarray,
    ref_labels: np.ndarray,
    *,
    components: int = 10,
    seed: int = 0,
) -> Detection:
    def decide(rows: np.ndarray, ref_rows: np.ndarray) -> np.ndarray:
        pca = PCA(n_components=min(components, len(rows) - 1, feats.shape[1]), random_state=seed)
        z = pca.fit_transform(feats[rows])
        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
        share = np.bincount(km.labels_, minlength=2) / len(rows)
        if len(ref_rows) < MIN_REFERENCE:
            poison = np.flatnonzero(share < CHEN_MAX_SIZE)
        else:
            ref_share = np.bincount(km.predict(pca.transform(ref_feats[ref_rows])), minlength=2) / len(ref_rows)
            # Trusted samples land in each legitimate cluster about as often as training samples do.
            poison = np.flatnonzero(ref_share < 0.25 * share)
        return np.flatnonzero(np.isin(km.labels_, poison))

    return _per_class("activation_clustering", labels, ref_labels, decide)


DETECTORS = {"spectral": spectral_signature, "activation_clustering": activation_clustering}

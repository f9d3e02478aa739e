"""One-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023): an empirical epsilon lower bound.

m canaries each enter training on an independent fair coin. After one training run the auditor scores every
canary, guesses "in" for the k+ highest scores and "out" for the k- lowest, abstains on the rest, and counts the
correct guesses v out of r = k+ + k-. Under (eps, delta)-DP, v exceeds a Binomial(r, e^eps / (1 + e^eps)) tail
only by a delta term (the paper's Theorem 3 / Corollary, computed as its Appendix D's ``p_value_DP_audit``), so
every eps whose p-value is below 1 - confidence is refuted: the largest is the reported lower bound.

>>> result = epsilon_lower_bound(scores, included, delta=1e-5)  # doctest: +SKIP
>>> result["epsilon_lower_bound"], result["k_pos"], result["k_neg"]  # doctest: +SKIP

Canaries (:func:`choose_canaries`, :func:`canary_training_set`): ``mislabel`` (default) takes m training samples
and gives each a wrong label drawn uniformly from the other classes; ``noise`` crafts m uniform-noise images
with uniformly random labels, outside the training data. Excluded canaries are dropped (mislabel) or never added
(noise). :func:`run_privacy_audit` trains one model through a caller's ``train_fn`` and returns the bound.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import binom
from torch import nn
from torch.utils.data import DataLoader, Dataset

from aisec_train.audit.canaries import (  # noqa: F401  (choose_canaries: part of this module's API)
    CanaryPlan,
    canary_eval_set,
    canary_training_set,
    choose_canaries,
    plan_canaries,
)
from aisec_train.errors import require

CONFIDENCE = 0.95
# Default grid of (k+, k-) as fractions of m. Every pair is a separate test, so the significance is split
# between them (Bonferroni): 20 pairs cost a factor 20 in significance (~0.7 in eps at most for a perfect attack).
POS_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 0.5)
NEG_FRACTIONS = (0.0, 0.1, 0.3, 0.5)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (eps, delta)-DP with m canaries (Appendix D, vectorised).

    beta is the Binomial(r, q) tail at v, q = e^eps / (1 + e^eps); the delta correction adds
    2 m delta max_i P[v - i <= Binomial(r, q) < v] / i.
    """
    require(0 <= v <= r <= m, "counts", (m, r, v), "0 <= correct <= guesses <= m")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # below[i-1] = P[v - i <= Bin < v]
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_from_counts(m: int, r: int, v: int, *, delta: float, significance: float) -> float:
    """The largest eps with p_value < significance (Appendix D's ``get_eps_audit``; bisection, low end)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < significance:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < significance else (lo, mid)
    return lo


def _as_ks(k: int | Sequence[int] | None, fractions: Sequence[float], m: int, name: str) -> list[int]:
    if k is None:
        return sorted({int(round(f * m)) if f == 0 else max(1, int(round(f * m))) for f in fractions})
    ks = [int(k)] if np.isscalar(k) else [int(v) for v in k]
    require(all(0 <= v <= m for v in ks), name, k, f"guess counts in [0, m={m}]")
    return ks


def epsilon_lower_bound(
    scores: Any,
    included: Any,
    *,
    delta: float,
    confidence: float = CONFIDENCE,
    k_pos: int | Sequence[int] | None = None,
    k_neg: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """Empirical epsilon lower bound from canary scores (higher = more likely included) and the true coins.

    With ``k_pos`` and ``k_neg`` both None, every pair of the default grid (``POS_FRACTIONS`` x ``NEG_FRACTIONS``
    of m) is tried at significance (1 - confidence) / pairs and the largest bound is reported: a union bound, so
    the result holds at ``confidence`` overall. Integers fix a pair (one test, no correction); sequences give
    a grid of their own. An omitted side defaults to 0 when the other is given.
    """
    scores, included = np.asarray(scores, dtype=float).ravel(), np.asarray(included).astype(bool).ravel()
    m = len(scores)
    require(m > 0 and included.shape == scores.shape, "scores", f"{m} scores, {included.size} coins", "one per canary")
    require(bool(np.all(np.isfinite(scores))), "scores", "NaN or inf", "finite canary scores")
    require(0 <= delta < 1, "delta", delta, "must be in [0, 1)")
    require(0.5 <= confidence < 1, "confidence", confidence, "must be in [0.5, 1)")
    if k_pos is not None or k_neg is not None:
        k_pos, k_neg = (0 if k_pos is None else k_pos), (0 if k_neg is None else k_neg)
    pairs = [
        (p, n)
        for p, n in itertools.product(
            _as_ks(k_pos, POS_FRACTIONS, m, "k_pos"), _as_ks(k_neg, NEG_FRACTIONS, m, "k_neg")
        )
        if 0 < p + n <= m
    ]
    require(len(pairs) > 0, "k_pos + k_neg", (k_pos, k_neg), f"at least one guess and at most m={m}")
    significance = (1 - confidence) / len(pairs)
    # Stable sort: tied scores keep canary order, which the coins cannot influence, so ties cannot leak.
    ordered = included[np.argsort(-scores, kind="stable")]
    top_in = np.r_[0, np.cumsum(ordered)]  # correct "in" guesses among the k highest
    bottom_out = np.r_[0, np.cumsum(~ordered[::-1])]  # correct "out" guesses among the k lowest
    best: dict[str, Any] = {}
    for p, n in pairs:
        v = int(top_in[p] + bottom_out[n])
        eps = epsilon_from_counts(m, p + n, v, delta=delta, significance=significance)
        if not best or eps > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": eps, "k_pos": p, "k_neg": n, "correct": v, "guesses": p + n}
    return {
        **best,
        "confidence": confidence,
        "m": m,
        "delta": delta,
        "included": int(included.sum()),
        "candidates": len(pairs),
        "selection": "fixed" if len(pairs) == 1 else f"max over {len(pairs)} (k_pos, k_neg) pairs, Bonferroni",
        # What m canaries could show at best (every guess right, no correction): a small value means the audit
        # is too weak to refute the claim whatever the model does.
        "epsilon_max": epsilon_from_counts(m, m, m, delta=delta, significance=1 - confidence),
    }


def canary_scores(model_logits: torch.Tensor, labels: Any) -> np.ndarray:
    """Logit-scaled confidence of each canary's assigned label: log p_y - log(1 - p_y), from logits (float64).

    A monotone function of the negative loss, but it does not saturate at p_y -> 1, where memorised canaries sit.
    """
    logits = torch.as_tensor(model_logits).detach().double().cpu()
    y = torch.as_tensor(labels).long().cpu()
    require(logits.ndim == 2 and y.shape == (len(logits),), "logits", tuple(logits.shape), "(N, classes), N labels")
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -math.inf)
    return (true - torch.logsumexp(others, dim=1)).numpy()


@torch.no_grad()
def score_model(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> np.ndarray:
    """:func:`canary_scores` of ``model`` on a dataset of (image, assigned label), in dataset order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits.append(model(x.to(device)).cpu())
        labels.append(y)
    model.train(was_training)
    return canary_scores(torch.cat(logits), torch.cat(labels))


def run_privacy_audit(
    train_fn: Callable[[Dataset], nn.Module],
    train_dataset: Dataset,
    *,
    m: int,
    seed: int,
    delta: float,
    canary_kind: str = "mislabel",
    num_classes: int | None = None,
    confidence: float = CONFIDENCE,
    keep_scores: bool = False,
) -> dict[str, Any]:
    """Train one canary model with ``train_fn`` and return :func:`epsilon_lower_bound`'s dict plus timings.

    ``train_dataset`` yields (image tensor in [0, 1], int label); ``train_fn(dataset) -> model`` must train with
    the audited model's recipe (same optimiser, epochs, sample rate and DP noise). The canary training set is a
    lazy wrapper around ``train_dataset`` (nothing is copied). ``keep_scores`` adds the m canary scores and
    coins (``scores``, ``included_mask``: lists) for plots or a second estimator.
    """
    started = time.perf_counter()
    plan: CanaryPlan = plan_canaries(train_dataset, m=m, seed=seed, kind=canary_kind, num_classes=num_classes)
    canary_set = canary_training_set(train_dataset, plan)
    model = train_fn(canary_set)
    trained = time.perf_counter()
    scores = score_model(model, canary_eval_set(train_dataset, plan))
    scored = time.perf_counter()
    result = epsilon_lower_bound(scores, plan.included, delta=delta, confidence=confidence)
    return {
        **result,
        "canary_kind": plan.kind,
        "training_samples": len(canary_set),
        "train_seconds": trained - started,
        "score_seconds": scored - trained,
        "seconds": time.perf_counter() - started,
        **({"scores": scores.tolist(), "included_mask": plan.included.tolist()} if keep_scores else {}),
    }


ITEM = "empirical privacy audit (one-run, Steinke et al. 2023)"


def verdict(result: dict[str, Any] | None, claimed_epsilon: float | None) -> dict[str, str]:
    """Checklist answer: ``fail`` when the lower bound exceeds the claimed epsilon (the DP claim is refuted)."""
    if result is None:
        return {"status": "not_applicable", "evidence": "one-run privacy audit not run"}
    bound = result["epsilon_lower_bound"]
    measured = (
        f"one-run audit (Steinke et al. 2023): epsilon >= {bound:.3f} at {result['confidence']:.0%} confidence "
        f"({result['correct']}/{result['guesses']} correct guesses on {result['m']} {result.get('canary_kind', '')} "
        f"canaries; at most {result['epsilon_max']:.2f} measurable)"
    )
    if claimed_epsilon is None:
        return {"status": "not_applicable", "evidence": f"{measured}; no DP claim to check"}
    if bound > claimed_epsilon:
        return {"status": "fail", "evidence": f"{measured} exceeds the claimed epsilon {claimed_epsilon:.3f}"}
    return {"status": "pass", "evidence": f"{measured} does not exceed the claimed epsilon {claimed_epsilon:.3f}"}

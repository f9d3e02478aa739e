"""Membership-inference audit: a loss-threshold attack and an offline LiRA attack (Carlini et al. 2022).

Targets, the attacker's pool and the reference models come from :mod:`aisec_train.audit.references` (balanced
members / non-members chosen by indices; OUT models from the run's model factory, trained by the one loop with
the audited run's recipe, none on any target). The targets are streamed once through every model. The loss attack
thresholds the per-sample loss; offline LiRA scores how far a target's logit-scaled confidence on the audited
model lies above the reference models' (a Gaussian with one global variance, which is what the paper recommends
for few reference models). AUCs carry a 95% bootstrap interval over targets.

Every model's logits on the targets and on up to ``references.POPULATION_SAMPLES`` pool samples are kept in a
:class:`~aisec_train.audit.signals.MembershipSignals` (``result.signals``): the input of any further attack
(RMIA) on the same reference models, added in :func:`attacks_from`.

>>> result = membership_audit(model, data, factory=run.factory, cfg=cfg, device=torch.device("cpu"))  # doctest: +SKIP
>>> result.summary["auc"], result.summary["tpr_at_fpr_0_001"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset

from aisec_train.audit import rmia
from aisec_train.audit.references import Targets, design, reference_configs, reference_recipe, train_reference_models
from aisec_train.audit.signals import MembershipSignals, logits_on, stack
from aisec_train.audit.significance import (  # noqa: F401 (re-exported: the attacks and levels of the check)
    AUDIT_ATTACKS,
    DP_CONFIDENCE,
    correction_words,
    dp_level,
    fp_levels,
)
from aisec_train.data.views import labels_of, subset
from aisec_train.report.outputs import save_figure
from aisec_train.train.config import PrivacyMode

if TYPE_CHECKING:
    from aisec_train.config import Config
    from aisec_train.data.dataset import DataBundle
    from aisec_train.models.factory import ModelFactory

FPR_POINTS = {"tpr_at_fpr_0_001": 0.001, "tpr_at_fpr_0_01": 0.01}


@dataclass
class AttackResult:
    name: str
    scores: np.ndarray  # higher = more likely a member
    labels: np.ndarray  # 1 = member


@dataclass
class MembershipResult:
    attacks: list[AttackResult]
    summary: dict[str, Any] = field(default_factory=dict)
    signals: MembershipSignals | None = None  # every model's logits on the targets and the population samples


def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """log(p_y / (1 - p_y)), computed from logits so that confident samples do not round to inf."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], -math.inf)
    return (true - torch.logsumexp(others, dim=1)).double().numpy()


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_max: float) -> float:
    """The highest measured TPR at a threshold whose FPR does not exceed ``fpr_max`` (no interpolation)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= fpr_max].max())


# The attacks whose DP-bound check the audit maximises over (loss; with reference models offline LiRA and RMIA):
# the Bonferroni family's attack factor. With fewer attacks (reference_models=0) it is conservative.
TIE_STREAM = 0x7E5  # the tie-breaking coins' own stream: never the stream that made a test's scores


def dp_bound_check(
    labels: np.ndarray, scores: np.ndarray, epsilon: float, delta: float, *,
    attacks: int = len(AUDIT_ATTACKS), confidence: float = DP_CONFIDENCE, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Do the measured (FPR, TPR) pairs respect TPR <= e^eps FPR + delta (Kairouz et al. 2015)?

    Raw pairs (every threshold of the ROC) are compared as measured. A violation counts as significant, and the
    empirical epsilon lower bound max log((TPR_lo - delta) / FPR_hi) is read, only at the thresholds of a grid
    fixed in advance: "member" = above the (c+1)-th highest non-member score, for c in :func:`fp_levels`
    (ties broken at random, seeded: a randomised attack, so the false positives are exactly c). TPR_lo and FPR_hi
    are one-sided Clopper-Pearson bounds at half of :func:`dp_level`'s significance each, Bonferroni over
    ``attacks`` (the attacks the caller maximises over) x the grid, so the bound and the verdict hold at
    ``confidence`` family-wise: at no leakage the maximum over attacks and thresholds is > 0 in at most 5% of
    audits. FPR_hi at the (c+1)-th order statistic is exact for the rank threshold (P[FPR > u] = P[Bin(n, u) <= c]).
    """
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
    fpr, tpr = roc_pairs(labels, scores)
    bound = np.exp(epsilon) * fpr + delta
    raw = tpr > bound + 1e-12
    # Strict ranks, ties broken by a seeded coin the labels cannot influence.
    order = np.lexsort((np.random.default_rng([seed, TIE_STREAM]).random(len(scores)), scores))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(len(scores))
    neg_desc = np.sort(ranks[labels == 0])[::-1]
    pos_sorted = np.sort(ranks[labels == 1])
    fp = fp_levels(n_neg)
    tp = (n_pos - np.searchsorted(pos_sorted, neg_desc[fp], side="right")).astype(float)
    level = dp_level(n_neg, attacks, confidence)
    # The last entry of each is the perfect attack's reading (TP = n_pos at FP = 0), for max_refutable_epsilon.
    tpr_lo = np.nan_to_num(beta.ppf(level / 2, np.r_[tp, n_pos], n_pos - np.r_[tp, n_pos] + 1), nan=0.0)
    fpr_hi = np.nan_to_num(beta.ppf(1 - level / 2, np.r_[fp, 0] + 1, n_neg - np.r_[fp, 0]), nan=1.0)
    (tpr_lo, perfect_tpr_lo), (fpr_hi, zero_fpr_hi) = (tpr_lo[:-1], tpr_lo[-1]), (fpr_hi[:-1], fpr_hi[-1])
    significant = tpr_lo > np.exp(epsilon) * fpr_hi + delta
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_lb = np.log(np.clip(tpr_lo - delta, 0, None) / fpr_hi)
    eps_lb = float(np.max(eps_lb[np.isfinite(eps_lb)], initial=0.0))
    # The largest epsilon these targets could refute at all: a perfect attack (every member above every
    # non-member: TPR 1 at FPR 0) read the same way. At or above it, "respected" is true whatever the model leaks.
    refutable = float(np.log(max(perfect_tpr_lo - delta, 1e-300) / zero_fpr_hi))
    return {
        "epsilon": epsilon,
        "delta": delta,
        "pairs": len(fpr),
        "raw_violations": int(raw.sum()),
        "thresholds_tested": len(fp),
        "significant_violations": int(significant.sum()),
        "respected": bool(not significant.any()),
        "empirical_epsilon_lower_bound": max(0.0, eps_lb),
        "max_refutable_epsilon": max(0.0, refutable),
        "can_refute": bool(perfect_tpr_lo > np.exp(epsilon) * zero_fpr_hi + delta),
        "confidence": confidence,
        "attacks_corrected": attacks,
        "level": level,
        "correction": correction_words(attacks, len(fp), confidence),
    }


def roc_pairs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold, as scikit-learn's ``roc_curve`` (collinear points dropped), in numpy alone:
    the DP-bound check runs once per attack, and the simulation tests run it thousands of times."""
    desc = np.argsort(-scores, kind="stable")
    y = labels[desc]
    last = np.r_[np.flatnonzero(np.diff(scores[desc])), len(y) - 1]  # the last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
    tps, fps = np.r_[0, tps[keep]], np.r_[0, fps[keep]]
    return fps / max(int(fps[-1]), 1), tps / max(int(tps[-1]), 1)


def collect_signals(
    model: nn.Module, references: list[nn.Module], data: DataBundle, targets: Targets, device: torch.device,
    population_in: np.ndarray, workers: int = 0,
) -> MembershipSignals:  # fmt: skip
    """Every model's logits on the targets (members, then non-members) and, with references, on the population."""
    target_set = ConcatDataset([subset(data.train, targets.members), subset(data.test, targets.nonmembers)])
    out = logits_on([model, *references], target_set, device, workers=workers)
    classes = out[0].shape[1]
    population = targets.population if references else targets.population[:0]
    z_set = subset(targets.pool, population)
    z_out = logits_on([model, *references], z_set, device, workers=workers) if len(population) else []
    empty = torch.empty(0, classes)
    return MembershipSignals(
        labels=np.r_[np.ones(targets.m), np.zeros(targets.m)].astype(np.int64),
        target_y=torch.from_numpy(labels_of(target_set)),
        target_logits=out[0],
        reference_logits=stack(out[1:], len(target_set), classes),
        population_y=torch.from_numpy(labels_of(z_set)),
        population_logits=z_out[0] if z_out else empty,
        population_reference_logits=stack(z_out[1:], len(population), classes),
        population_in=population_in if references else np.zeros((0, 0), dtype=bool),
        population_member=population < targets.pool_members,
    )


def loss_attack(s: MembershipSignals) -> AttackResult:
    return AttackResult(
        "loss", -F.cross_entropy(s.target_logits, s.target_y, reduction="none").double().numpy(), s.labels
    )


def lira_offline(s: MembershipSignals) -> AttackResult:
    ref_conf = np.stack([logit_confidence(r, s.target_y) for r in s.reference_logits])  # (refs, 2m)
    mu = ref_conf.mean(axis=0)
    # One global variance: with 2-4 reference models a per-sample variance is too noisy (LiRA, sec. 4.2).
    sigma = float(np.std(ref_conf - mu)) if s.references > 1 else float(np.std(ref_conf))
    return AttackResult(
        "lira_offline", (logit_confidence(s.target_logits, s.target_y) - mu) / max(sigma, 1e-6), s.labels
    )


def attacks_from(signals: MembershipSignals) -> list[AttackResult]:
    """Every attack the audit reports; each scores the same targets from the same signals."""
    attacks = [loss_attack(signals)]
    if signals.references:
        attacks.append(lira_offline(signals))
        # RMIA (Zarifzadeh et al. 2024), offline, from the same reference models and population samples.
        attacks.append(AttackResult("rmia", rmia.rmia_scores(**signals.true_label_probabilities()), signals.labels))
    return attacks


def membership_audit(
    model: nn.Module,
    data: DataBundle,
    *,
    factory: ModelFactory,
    cfg: Config,
    device: torch.device,
    noise_multiplier: float | None = None,
    max_steps: int | None = None,
) -> MembershipResult:
    """Loss and (with reference models) offline LiRA attacks on balanced member / non-member targets.

    ``factory`` makes the reference models (the run's model factory); ``noise_multiplier`` is the audited run's
    measured DP noise, reused by the reference models; ``max_steps`` the steps it took (a run the privacy budget
    stopped early took fewer than its epochs plan), which no reference model passes.
    """
    audit = cfg.audit.membership
    # Every held-out sample may be a non-member target: the reference models' pool is then the rest of the
    # training split, same distribution and no target in it. More targets, finer FPR resolution.
    m = min(audit.targets, len(data.test), len(data.train) // 2)  # type: ignore[arg-type]
    targets = design(data, m, cfg.train.seed)
    reference: dict[str, Any] = {"reference_models": audit.reference_models}
    refs, population_in = [], np.zeros((0, 0), dtype=bool)
    if audit.reference_models:
        refs, population_in, steps = train_reference_models(
            cfg, data, factory, targets, device, noise_multiplier, max_steps=max_steps
        )
        half = len(targets.pool) // 2
        ref_train, ref_privacy = reference_configs(cfg, len(data.train), half, noise_multiplier)  # type: ignore[arg-type]
        recipe = reference_recipe(cfg)
        reference.update(
            reference_epochs=ref_train.epochs,
            reference_max_steps=max_steps,  # the audited run's steps (under DP), which no reference model passes
            reference_steps=steps,
            reference_batch_size=ref_train.batch_size,
            reference_train_size=half,
            reference_noise_multiplier=ref_privacy.noise_multiplier if ref_privacy.mode is PrivacyMode.dpsgd else None,
            reference_objective=recipe["objective"].name,
            reference_optimizer=(recipe["optimizer"] or {}).get("_target_", "torch.optim.SGD"),
            reference_model=factory.target,
        )
    signals = collect_signals(model, refs, data, targets, device, population_in, cfg.dataset.workers)
    attacks = attacks_from(signals)

    per_attack = {a.name: rmia.attack_metrics(a.labels, a.scores, seed=cfg.train.seed) for a in attacks}
    # The headline is the strongest attack's (highest TPR at 0.1% FPR, then AUC): one attack's figures together,
    # with their confidence intervals, as a reviewer quotes them.
    strongest = rmia.strongest_attack(per_attack)
    summary: dict[str, Any] = {
        key: per_attack[strongest][key] for key in ("auc", "auc_ci95", *FPR_POINTS, *(f"{k}_ci95" for k in FPR_POINTS))
    }
    summary.update(
        attacks=per_attack,
        strongest_attack=strongest,
        auc_attack=strongest,
        max_auc=audit.max_auc,  # the non-private pass's bar for the AUC's 95% CI upper bound (evidence.membership)
        members=m,
        nonmembers=m,
        fpr_resolution=1.0 / m,
        population_samples=len(signals.population_y),
        population_heldout=int((~signals.population_member).sum()),
        **reference,
    )
    return MembershipResult(attacks, summary, signals)


def plot_roc(attacks: list[AttackResult], path: Path, epsilon: float | None = None, delta: float = 0.0) -> None:
    """Log-log ROC (the low-FPR region is what matters for membership inference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for attack in attacks:
        fpr, tpr, _ = roc_curve(attack.labels, attack.scores)
        auc = roc_auc_score(attack.labels, attack.scores)
        ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=f"{attack.name} (AUC {auc:.3f})")
    grid = np.logspace(-4, 0, 200)
    ax.plot(grid, grid, "k:", label="chance")
    if epsilon is not None:
        ax.plot(grid, np.minimum(1, np.exp(epsilon) * grid + delta), "r--", label=f"DP bound (eps {epsilon:.2f})")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(1e-3, 1),
        ylim=(1e-3, 1),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="membership inference ROC",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)

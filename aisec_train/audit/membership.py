"""Membership-inference audit: a loss-threshold attack and an offline LiRA attack (Carlini et al. 2022).

Targets are balanced: ``m`` members drawn from the training split and ``m`` non-members from the held-out
split. The attacker's own data (the "pool") is everything else: the remaining training and held-out samples.
Offline LiRA trains ``reference_models`` OUT models with the spine's :func:`~aisec_train.train.loop.train`
on random halves of that pool, so no target is in any reference model. They mimic the audited training
(:func:`reference_configs`: same model, optimiser and epochs, the same sample rate and, under DP, the audited
run's noise multiplier). A target's score is how far its logit-scaled confidence on the audited model lies
above the reference models' (a Gaussian with one global variance, which is what the paper recommends for few
reference models). AUCs carry a 95% bootstrap interval over targets.

>>> result = membership_audit(model, data, cfg=..., device=torch.device("cpu"))  # doctest: +SKIP
>>> result.summary["auc"], result.summary["tpr_at_fpr_0_001"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F

from aisec_train.config import Accountant, Config, PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.data.dataset import Dataset, Split
from aisec_train.models import build_model
from aisec_train.train.loop import train

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


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


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


def dp_bound_check(labels: np.ndarray, scores: np.ndarray, epsilon: float, delta: float) -> dict[str, Any]:
    """Do the measured (FPR, TPR) pairs respect TPR <= e^eps FPR + delta (Kairouz et al. 2015)?

    Raw pairs are compared as measured; a violation counts as significant only if the 95% Clopper-Pearson
    lower bound of TPR exceeds the bound at the upper bound of FPR (few targets make raw pairs noisy). The
    empirical epsilon lower bound is the largest log((TPR_lo - delta) / FPR_hi) over thresholds.
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
    tp, fp = np.rint(tpr * n_pos), np.rint(fpr * n_neg)
    tpr_lo = np.nan_to_num(beta.ppf(0.025, tp, n_pos - tp + 1), nan=0.0)
    fpr_hi = np.nan_to_num(beta.ppf(0.975, fp + 1, n_neg - fp), nan=1.0)
    bound = np.exp(epsilon) * fpr + delta
    raw = tpr > bound + 1e-12
    significant = tpr_lo > np.exp(epsilon) * fpr_hi + delta
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_lb = np.log(np.clip(tpr_lo - delta, 0, None) / fpr_hi)
    eps_lb = float(np.max(eps_lb[np.isfinite(eps_lb)], initial=0.0))
    return {
        "epsilon": epsilon,
        "delta": delta,
        "pairs": len(fpr),
        "raw_violations": int(raw.sum()),
        "significant_violations": int(significant.sum()),
        "respected": bool(not significant.any()),
        "empirical_epsilon_lower_bound": max(0.0, eps_lb),
    }


def _metrics(attack: AttackResult) -> dict[str, float]:
    out = {"auc": float(roc_auc_score(attack.labels, attack.scores))}
    out.update({key: tpr_at_fpr(attack.labels, attack.scores, f) for key, f in FPR_POINTS.items()})
    return out


def choose_targets(data: Dataset, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``m`` members (training split) and ``m`` non-members (held-out split)."""
    return rng.permutation(len(data.train))[:m], rng.permutation(len(data.test))[:m]


def _pool(data: Dataset, members: np.ndarray, nonmembers: np.ndarray) -> Split:
    keep_train = np.setdiff1d(np.arange(len(data.train)), members)
    keep_test = np.setdiff1d(np.arange(len(data.test)), nonmembers)
    return Split(
        torch.cat([data.train.x[keep_train], data.test.x[keep_test]]),
        torch.cat([data.train.y[keep_train], data.test.y[keep_test]]),
    )


def reference_configs(
    cfg: Config, n_target: int, n_reference: int, noise_multiplier: float | None
) -> tuple[TrainConfig, PrivacyConfig]:
    """Training settings for an OUT model that mimic the audited model's training on a smaller set.

    LiRA's reference models must be trained like the target. On a pool half the size, the same batch size
    would halve the steps per epoch (a less fitted model) and, under DP, double the sample rate. Scaling the
    batch keeps the sample rate and step count; under DP the audited run's measured noise multiplier is
    reused instead of calibrating again, so no accountant work decides the noise (GDP only keeps the books).
    """
    audit = cfg.audit.membership
    epochs = min(audit.reference_epochs or cfg.train.epochs, cfg.train.epochs)
    batch = max(1, round(cfg.train.batch_size * n_reference / n_target))
    train_cfg = dataclasses.replace(
        cfg.train,
        epochs=epochs,
        batch_size=batch,
        max_physical_batch_size=min(batch, cfg.train.max_physical_batch_size),
    )
    privacy = cfg.privacy
    if privacy.mode is PrivacyMode.dpsgd and noise_multiplier is not None:
        privacy = dataclasses.replace(
            privacy, target_epsilon=None, noise_multiplier=noise_multiplier, accountant=Accountant.gdp
        )
    return train_cfg, privacy


def train_reference_models(
    cfg: Config, data: Dataset, pool: Split, device: torch.device, noise_multiplier: float | None = None
) -> list[nn.Module]:
    """OUT models for offline LiRA: each on a random half of the pool, trained by the spine's train()."""
    rng = np.random.default_rng(cfg.train.seed + 7919)
    models = []
    for i in range(cfg.audit.membership.reference_models):
        half = torch.as_tensor(rng.permutation(len(pool))[: len(pool) // 2])
        train_cfg, privacy_cfg = reference_configs(cfg, len(data.train), len(half), noise_multiplier)
        train_cfg = dataclasses.replace(train_cfg, seed=cfg.train.seed + 1 + i)
        torch.manual_seed(train_cfg.seed)
        model = build_model(
            cfg.model.name.value, in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size
        )
        result = train(
            model,
            Split(pool.x[half], pool.y[half]),
            train_cfg=train_cfg,
            privacy_cfg=privacy_cfg,
            device=device,
            progress=False,
        )
        models.append(result.model.eval())
    return models


def auc_interval(labels: np.ndarray, scores: np.ndarray, seed: int = 0, resamples: int = 200) -> list[float]:
    """95% bootstrap interval of the AUC over targets: how much the figure would move with other targets."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    aucs = []
    for _ in range(resamples):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        aucs.append(roc_auc_score(labels[idx], scores[idx]))
    return [float(v) for v in np.percentile(aucs, [2.5, 97.5])]


def membership_audit(
    model: nn.Module,
    data: Dataset,
    *,
    cfg: Config,
    device: torch.device,
    noise_multiplier: float | None = None,
) -> MembershipResult:
    """Loss and (with reference models) offline LiRA attacks on balanced member / non-member targets.

    ``noise_multiplier`` is the audited run's measured DP noise, reused by the reference models.
    """
    audit = cfg.audit.membership
    rng = np.random.default_rng(cfg.train.seed + 104729)
    # Every held-out sample may be a non-member target: the reference models' pool is then the rest of the
    # training split, same distribution and no target in it. More targets, finer FPR resolution.
    m = min(audit.targets, len(data.test), len(data.train) // 2)
    members, nonmembers = choose_targets(data, m, rng)
    x = torch.cat([data.train.x[members], data.test.x[nonmembers]])
    y = torch.cat([data.train.y[members], data.test.y[nonmembers]])
    labels = np.r_[np.ones(m), np.zeros(m)].astype(np.int64)

    logits = logits_of(model, x, device)
    attacks = [AttackResult("loss", -F.cross_entropy(logits, y, reduction="none").double().numpy(), labels)]
    reference: dict[str, Any] = {"reference_models": audit.reference_models}
    if audit.reference_models:
        pool = _pool(data, members, nonmembers)
        refs = train_reference_models(cfg, data, pool, device, noise_multiplier)
        ref_conf = np.stack([logit_confidence(logits_of(r, x, device), y) for r in refs])  # (refs, 2m)
        mu = ref_conf.mean(axis=0)
        # One global variance: with 2-4 reference models a per-sample variance is too noisy (LiRA, sec. 4.2).
        sigma = float(np.std(ref_conf - mu)) if len(refs) > 1 else float(np.std(ref_conf))
        attacks.append(AttackResult("lira_offline", (logit_confidence(logits, y) - mu) / max(sigma, 1e-6), labels))
        ref_train, ref_privacy = reference_configs(cfg, len(data.train), len(pool) // 2, noise_multiplier)
        reference.update(
            reference_epochs=ref_train.epochs,
            reference_batch_size=ref_train.batch_size,
            reference_train_size=len(pool) // 2,
            reference_noise_multiplier=ref_privacy.noise_multiplier if ref_privacy.mode is PrivacyMode.dpsgd else None,
        )

    per_attack = {a.name: {**_metrics(a), "auc_ci95": auc_interval(a.labels, a.scores)} for a in attacks}
    summary: dict[str, Any] = {
        # The headline is the auditor's worst case: each figure is the largest over the attacks run.
        key: max(v[key] for v in per_attack.values())
        for key in ("auc", *FPR_POINTS)
    }
    worst = max(per_attack, key=lambda name: per_attack[name]["auc"])
    summary.update(
        attacks=per_attack,
        auc_attack=worst,
        auc_ci95=per_attack[worst]["auc_ci95"],
        members=m,
        nonmembers=m,
        fpr_resolution=1.0 / m,
        **reference,
    )
    return MembershipResult(attacks, summary)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)

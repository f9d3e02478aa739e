"""Membership-inference audit: a loss-threshold attack and an offline LiRA attack (Carlini et al. 2022).

Targets are balanced: ``m`` members drawn from the training split and ``m`` non-members from the held-out
split. The attacker's own data (the "pool") is everything else: the remaining training and held-out samples.
Offline LiRA trains ``reference_models`` OUT models with the spine's :func:`~aisec_train.train.loop.train`
(same model, privacy and optimiser config) on random halves of that pool, so no target is in any reference
model; a target's score is how far its logit-scaled confidence on the audited model lies above the reference
models' (a Gaussian with one global variance, which is what the paper recommends for few reference models).

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

from aisec_train.config import Config
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


def train_reference_models(cfg: Config, data: Dataset, pool: Split, device: torch.device) -> list[nn.Module]:
    """OUT models for offline LiRA: each on a random half of the pool, trained by the spine's train()."""
    audit = cfg.audit.membership
    epochs = min(audit.reference_epochs or cfg.train.epochs, cfg.train.epochs)
    rng = np.random.default_rng(cfg.train.seed + 7919)
    models = []
    for i in range(audit.reference_models):
        half = torch.as_tensor(rng.permutation(len(pool))[: len(pool) // 2])
        train_cfg = dataclasses.replace(cfg.train, epochs=epochs, seed=cfg.train.seed + 1 + i)
        torch.manual_seed(train_cfg.seed)
        model = build_model(
            cfg.model.name.value, in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size
        )
        result = train(
            model,
            Split(pool.x[half], pool.y[half]),
            train_cfg=train_cfg,
            privacy_cfg=cfg.privacy,
            device=device,
            progress=False,
        )
        models.append(result.model)
    return models


def membership_audit(model: nn.Module, data: Dataset, *, cfg: Config, device: torch.device) -> MembershipResult:
    audit = cfg.audit.membership
    rng = np.random.default_rng(cfg.train.seed + 104729)
    # LiRA needs held-out samples left over for the attacker's pool, so it takes at most half the test split.
    cap = len(data.test) // 2 if audit.reference_models else len(data.test)
    m = min(audit.targets, cap, len(data.train) // 2)
    members, nonmembers = choose_targets(data, m, rng)
    x = torch.cat([data.train.x[members], data.test.x[nonmembers]])
    y = torch.cat([data.train.y[members], data.test.y[nonmembers]])
    labels = np.r_[np.ones(m), np.zeros(m)].astype(np.int64)

    logits = logits_of(model, x, device)
    attacks = [AttackResult("loss", -F.cross_entropy(logits, y, reduction="none").double().numpy(), labels)]
    if audit.reference_models:
        refs = train_reference_models(cfg, data, _pool(data, members, nonmembers), device)
        ref_conf = np.stack([logit_confidence(logits_of(r, x, device), y) for r in refs])  # (refs, 2m)
        mu = ref_conf.mean(axis=0)
        # One global variance: with 2-4 reference models a per-sample variance is too noisy (LiRA, sec. 4.2).
        sigma = float(np.std(ref_conf - mu)) if len(refs) > 1 else float(np.std(ref_conf))
        attacks.append(AttackResult("lira_offline", (logit_confidence(logits, y) - mu) / max(sigma, 1e-6), labels))

    per_attack = {a.name: _metrics(a) for a in attacks}
    summary: dict[str, Any] = {
        # The headline is the auditor's worst case: each figure is the largest over the attacks run.
        key: max(v[key] for v in per_attack.values())
        for key in ("auc", *FPR_POINTS)
    }
    summary.update(
        attacks=per_attack,
        members=m,
        nonmembers=m,
        fpr_resolution=1.0 / m,
        reference_models=audit.reference_models,
        reference_epochs=min(audit.reference_epochs or cfg.train.epochs, cfg.train.epochs)
        if audit.reference_models
        else None,
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

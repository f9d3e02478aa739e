"""Membership-inference metrics against brute-force and scikit-learn references, and the DP-bound check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from aisec_train.audit import membership, references, rmia
from aisec_train.config import Config
from aisec_train.data.dataset import DataBundle
from aisec_train.data.views import Sample, materialize, subset
from aisec_train.models import ModelFactory
from aisec_train.robust.config import RobustMode
from aisec_train.train.config import PrivacyConfig, PrivacyMode
from aisec_train.train.objectives import Adversarial, CrossEntropy
from tests.conftest import read_report


def brute_force_tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_max: float) -> float:
    """Every threshold tried: the best TPR whose FPR (score >= threshold) stays <= fpr_max."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    thresholds = np.r_[np.unique(scores), np.inf][:, None]
    fpr, tpr = (neg >= thresholds).mean(1), (pos >= thresholds).mean(1)
    return float(tpr[fpr <= fpr_max].max())


def brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def crafted() -> tuple[np.ndarray, np.ndarray]:
    """1000 non-members at 0..999; members: 7 above every non-member, 5 between the top two, 988 at the bottom.

    At 0.1% FPR one non-member may be flagged, so 12 of 1000 members are caught; at 0% FPR, 7.
    """
    neg = np.arange(1000, dtype=float)
    pos = np.r_[np.full(7, 2000.0), np.full(5, 998.5), np.linspace(-500, -1, 988)]
    return np.r_[np.ones(1000), np.zeros(1000)].astype(int), np.r_[pos, neg]


def test_tpr_at_low_fpr_on_crafted_scores():
    labels, scores = crafted()
    assert membership.tpr_at_fpr(labels, scores, 0.001) == pytest.approx(0.012)
    assert membership.tpr_at_fpr(labels, scores, 0.0) == pytest.approx(0.007)
    assert membership.tpr_at_fpr(labels, scores, 0.01) == pytest.approx(0.012)  # nothing else above 990


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 600
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    scores = np.round(np.r_[rng.normal(1.0, 1, n), rng.normal(0, 1, n)], 1)  # rounding makes ties
    fpr, tpr, _ = roc_curve(labels, scores)
    for f in (0.001, 0.01, 0.1):
        got = membership.tpr_at_fpr(labels, scores, f)
        assert got == pytest.approx(brute_force_tpr_at_fpr(labels, scores, f))
        assert got == pytest.approx(tpr[fpr <= f].max())
    metrics = rmia.attack_metrics(labels, scores, seed=seed)  # what the audit reports for every attack
    assert metrics["auc"] == pytest.approx(brute_force_auc(labels, scores))
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["tpr_at_fpr_0_01"] == pytest.approx(brute_force_tpr_at_fpr(labels, scores, 0.01))
    lo, hi = metrics["auc_ci95"]
    assert lo < metrics["auc"] < hi and hi - lo < 0.15


def randomized_response(eps: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An eps-DP membership mechanism: members answer 1 with probability e^eps / (1 + e^eps)."""
    rng = np.random.default_rng(seed)
    p = math.exp(eps) / (1 + math.exp(eps))
    scores = np.r_[rng.random(n) < p, rng.random(n) < 1 - p].astype(float)
    return np.r_[np.ones(n), np.zeros(n)].astype(int), scores


def test_dp_bound_respected_by_a_dp_mechanism():
    labels, scores = randomized_response(1.0, 4000, seed=0)
    check = membership.dp_bound_check(labels, scores, epsilon=1.0, delta=1e-5)
    assert check["respected"] and check["significant_violations"] == 0
    # the mechanism sits on the bound: its measured epsilon lower bound approaches (but stays under) 1.0
    assert 0.7 < check["empirical_epsilon_lower_bound"] <= 1.0


def test_dp_bound_violated_by_a_perfect_attack():
    labels = np.r_[np.ones(500), np.zeros(500)].astype(int)
    scores = labels + 0.01 * np.random.default_rng(0).random(1000)  # members always score higher
    check = membership.dp_bound_check(labels, scores, epsilon=0.5, delta=1e-5)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert check["raw_violations"] == int((tpr > math.exp(0.5) * fpr + 1e-5).sum()) > 0
    assert not check["respected"] and check["empirical_epsilon_lower_bound"] > 0.5


def test_reference_models_mimic_the_audited_training():
    cfg = Config()
    cfg.train.batch_size, cfg.train.epochs = 512, 40
    train_cfg, privacy = references.reference_configs(cfg, n_target=1437, n_reference=718, noise_multiplier=5.2)
    # same sample rate (batch / n) and so the same steps per epoch and per run as the audited model
    assert train_cfg.batch_size / 718 == pytest.approx(512 / 1437, rel=0.01) and train_cfg.epochs == 40
    assert privacy.noise_multiplier == 5.2 and privacy.target_epsilon is None
    cfg.privacy = PrivacyConfig(mode=PrivacyMode.none)
    _, privacy = references.reference_configs(cfg, 1437, 718, noise_multiplier=None)
    assert privacy.mode is PrivacyMode.none


def test_run_reports_membership_audit(smoke_run):
    report = read_report(smoke_run)
    mia = report["audit"]["membership"]
    assert set(mia["attacks"]) == {"loss", "lira_offline", "rmia"}
    strongest = mia["strongest_attack"]
    assert strongest == rmia.strongest_attack(mia["attacks"])  # highest TPR at 0.1% FPR, then AUC
    for key in ("auc", "tpr_at_fpr_0_001", "tpr_at_fpr_0_01", "auc_ci95", "tpr_at_fpr_0_001_ci95"):
        assert mia[key] == mia["attacks"][strongest][key]  # one attack's figures, with their intervals
    assert all(0.0 <= a["auc"] <= 1.0 and len(a["tpr_at_fpr_0_01_ci95"]) == 2 for a in mia["attacks"].values())
    assert mia["members"] == mia["nonmembers"] > 0
    assert mia["dp_bound"]["attacks"]["loss"]["epsilon"] == pytest.approx(report["privacy"]["epsilon"])
    assert mia["reference_noise_multiplier"] == pytest.approx(report["privacy"]["noise_multiplier"])
    assert (smoke_run / mia["roc_png"]).stat().st_size > 5000


def tiny_bundle(n_train: int = 120, n_test: int = 50) -> DataBundle:
    """Three separable classes of 1x6x10 images (non-square on purpose), as in-memory datasets."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> Sample:
        y = torch.arange(n) % 3
        x = (0.3 * torch.rand(n, 1, 6, 10, generator=g) + 0.2 * y[:, None, None, None]).clamp(0, 1)
        return Sample(x, y)

    return DataBundle("tiny", make(n_train), make(n_test), 3, (1, 6, 10), manifest={})


def tiny_config(**membership_cfg) -> Config:
    cfg = Config()
    cfg.privacy = PrivacyConfig(mode=PrivacyMode.none)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.ema_decay = 2, 32, 0.1, 0.0
    cfg.optimizer = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}
    for key, value in membership_cfg.items():
        setattr(cfg.audit.membership, key, value)
    return cfg


def test_design_keeps_every_target_out_of_the_pool():
    data = tiny_bundle()
    t = references.design(data, m=30, seed=0)
    assert len(set(t.members)) == len(set(t.nonmembers)) == 30
    train_part, test_part = t.pool.datasets
    assert not set(train_part.indices) & set(t.members.tolist()) and len(train_part) == 120 - 30
    assert not set(test_part.indices) & set(t.nonmembers.tolist()) and len(test_part) == 50 - 30
    assert t.pool_members == 90 and len(t.population) == len(t.pool) == 110
    # RMIA's population: the 20 unused held-out samples (non-members of the audited model) come first
    assert (t.population[:20] >= 90).all() and (t.population[20:] < 90).all()
    again = references.design(data, m=30, seed=0)
    assert (again.members == t.members).all() and (again.population == t.population).all()


def test_reference_recipe_is_the_audited_runs():
    cfg = tiny_config()
    cfg.scheduler = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR"}
    recipe = references.reference_recipe(cfg)
    assert recipe["optimizer"] == cfg.optimizer and recipe["scheduler"] == cfg.scheduler
    assert isinstance(recipe["objective"], CrossEntropy)
    cfg.robustness.mode = RobustMode.pgd_at
    cfg.robustness.resolve("digits")
    recipe = references.reference_recipe(cfg)
    assert isinstance(recipe["objective"], Adversarial) and recipe["objective"].name == "pgd_at"


def test_membership_audit_on_datasets_keeps_the_signals_for_rmia():
    data, cfg = tiny_bundle(), tiny_config(targets=20, reference_models=2)
    factory = ModelFactory({"_target_": "aisec_train.models.MLP", "hidden": 16}, input_shape=(1, 6, 10), num_classes=3)
    model = factory(seed=0).eval()
    result = membership.membership_audit(model, data, factory=factory, cfg=cfg, device=torch.device("cpu"))
    summary, s = result.summary, result.signals
    assert {"auc", "tpr_at_fpr_0_001", "tpr_at_fpr_0_01", "auc_ci95"} <= set(summary)
    assert set(summary["attacks"]) == {"loss", "lira_offline", "rmia"} and summary["members"] == 20
    assert summary["reference_optimizer"] == "torch.optim.SGD" and summary["reference_objective"] == "standard"
    # the streamed logits are the audited model's on the targets, members first, in the design's order
    t = references.design(data, m=20, seed=cfg.train.seed)
    x_members, y_members = materialize(subset(data.train, t.members))
    torch.testing.assert_close(s.target_logits[:20], model(x_members).detach())
    assert torch.equal(s.target_y[:20], y_members) and s.labels.tolist() == [1] * 20 + [0] * 20
    z = len(t.population)
    assert s.reference_logits.shape == (2, 40, 3) and s.population_reference_logits.shape == (2, z, 3)
    assert s.population_in.shape == (2, z) and 0 < s.population_in.mean() < 1  # each model saw about half
    assert summary["population_samples"] == z and summary["population_heldout"] == 30
    probs = s.true_label_probabilities()
    assert probs["target_x"].shape == (40,) and probs["ref_z"].shape == (2, z)
    scores = rmia.rmia_scores(**probs)  # what aisec_train/audit/rmia.py consumes, unchanged
    assert scores.shape == (40,) and ((scores >= 0) & (scores <= 1)).all()


def test_membership_audit_without_reference_models_runs_the_loss_attack_only():
    data, cfg = tiny_bundle(), tiny_config(targets=15, reference_models=0)
    factory = ModelFactory({"_target_": "aisec_train.models.MLP", "hidden": 16}, input_shape=(1, 6, 10), num_classes=3)
    result = membership.membership_audit(factory(seed=0), data, factory=factory, cfg=cfg, device=torch.device("cpu"))
    assert set(result.summary["attacks"]) == {"loss"} and result.signals.references == 0
    assert result.signals.population_logits.shape == (0, 3) and result.summary["population_samples"] == 0

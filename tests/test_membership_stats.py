"""The membership item's statistics: the non-private pass needs the AUC's 95% CI upper bound at most max_auc, and
the DP bound check holds at 95% family-wise (Bonferroni over the attacks and the thresholds it maximises over)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aisec_train.audit import evidence, membership, rmia
from aisec_train.models import ModelFactory
from tests.test_audit_membership import tiny_bundle, tiny_config


def _summary(auc: float, ci: tuple[float, float], m: int = 200, **extra) -> dict:
    """A non-private membership summary as membership_audit writes it (the strongest attack's figures)."""
    return {
        "auc": auc, "auc_ci95": list(ci), "tpr_at_fpr_0_001": 0.0, "tpr_at_fpr_0_01": 0.01, "auc_attack": "rmia",
        "strongest_attack": "rmia", "attacks": {"loss": {}, "lira_offline": {}, "rmia": {}}, "members": m,
        "nonmembers": m, "reference_models": 2, "fpr_resolution": 1 / m, **extra,
    }  # fmt: skip


def test_a_non_private_pass_needs_the_auc_interval_below_max_auc():
    """AUC 0.55 with CI 0.50-0.62 used to pass (point <= 0.6): the targets cannot show AUC <= 0.6."""
    wide = _summary(0.55, (0.50, 0.62), max_auc=0.6)
    status, text = evidence.membership(wide, None, 0.0, 0.6)
    assert status == "fail" and evidence.untestable(wide), text  # the stage then gives TOO_FEW_TARGETS_FIX
    assert "NOT TESTED: too few targets to show AUC <= 0.6" in text and "upper bound 0.620" in text
    # The upper half-width 0.07 must shrink to 0.05: 200 * (0.07 / 0.05)^2 = 392 members.
    assert evidence.targets_to_show_auc(wide, 0.6) == 392 and "about 392 members and as many non-members" in text
    status, text = evidence.membership(_summary(0.55, (0.50, 0.59)), None, 0.0, 0.6)
    assert status == "pass" and "NOT TESTED" not in text and "95% CI upper bound <= 0.6" in text
    above = _summary(0.65, (0.60, 0.70), max_auc=0.6)  # the point itself is above: an ordinary fail
    status, text = evidence.membership(above, None, 0.0, 0.6)
    assert status == "fail" and "NOT TESTED" not in text and not evidence.untestable(above)
    assert "more membership targets" in evidence.TOO_FEW_TARGETS_FIX


def test_the_auc_interval_rule_on_real_attack_metrics():
    """Scores of a weak attack (true AUC ~0.55): 150 + 150 targets cannot show AUC <= 0.6, and about the number
    the evidence names, drawn the same way, can."""
    rng = np.random.default_rng(1)
    shift = math.sqrt(2) * 0.1257  # Phi(shift / sqrt 2) = 0.55

    def summary(m: int) -> dict:
        labels = np.r_[np.ones(m), np.zeros(m)].astype(int)
        metrics = rmia.attack_metrics(labels, np.r_[rng.normal(shift, 1, m), rng.normal(0, 1, m)], seed=0)
        return {**_summary(metrics["auc"], metrics["auc_ci95"], m, max_auc=0.6), **metrics}

    few = summary(150)
    assert few["auc"] < 0.6 < few["auc_ci95"][1], few  # the old rule (point <= max_auc) passed this
    status, text = evidence.membership(few, None, 0.0, 0.6)
    assert status == "fail" and "NOT TESTED" in text and evidence.untestable(few)
    enough = summary(evidence.targets_to_show_auc(few, 0.6))
    status, text = evidence.membership(enough, None, 0.0, 0.6)
    assert status == "pass", text


def test_membership_audit_records_the_bar_its_pass_is_read_against():
    """The stage's fix (TOO_FEW_TARGETS_FIX) follows evidence.untestable(summary), which reads summary['max_auc']."""
    data, cfg = tiny_bundle(), tiny_config(targets=15, reference_models=0, max_auc=0.7)
    factory = ModelFactory({"_target_": "aisec_train.models.MLP", "hidden": 16}, input_shape=(1, 6, 10), num_classes=3)
    summary = membership.membership_audit(
        factory(seed=0), data, factory=factory, cfg=cfg, device=torch.device("cpu")
    ).summary
    assert summary["max_auc"] == 0.7
    lo, hi = summary["auc_ci95"]
    status, _ = evidence.membership(summary, None, 0.0, 0.7)
    assert evidence.untestable(summary) == (summary["auc"] < 0.7 < hi)
    assert (status == "pass") == (max(hi, summary["auc"]) <= 0.7)


def test_no_leakage_empirical_epsilon_is_rarely_above_zero():
    """Members and non-members from one distribution, three attacks per audit (independent scores: the worst case
    for the maximum), 400 audits of 200 + 200 targets: the maximum over attacks and thresholds of the empirical
    epsilon lower bound is > 0 in at most 5% of audits at the family-wise level (0 measured here). Per-pair 95%
    bounds maximised over 3 attacks and every ROC threshold were > 0 in 12% of them."""
    rng = np.random.default_rng(0)
    n, trials = 200, 400
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    above = 0
    for _ in range(trials):
        checks = [membership.dp_bound_check(labels, rng.normal(size=2 * n), 3.0, 1e-5) for _ in range(3)]
        above += max(c["empirical_epsilon_lower_bound"] for c in checks) > 0
    assert above / trials <= 0.08, above


def test_the_dp_check_states_and_uses_its_family_wise_level():
    """360 + 360 targets: 3 attacks x 10 thresholds (false positives 0, 1, 2, 4, ..., 256), each at 0.05 / 30."""
    n = 360
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    perfect = labels + np.linspace(0, 0.5, 2 * n)
    check = membership.dp_bound_check(labels, perfect, 3.0, 1e-5)
    assert check["thresholds_tested"] == 10 and check["level"] == pytest.approx(0.05 / 30)
    assert check["correction"] == "95% family-wise, Clopper-Pearson, Bonferroni over 3 attack(s) x 10 thresholds"
    q = (0.05 / 30 / 2) ** (1 / n)  # a perfect attack's TPR lower bound; 1 - q bounds its FPR from above
    assert check["max_refutable_epsilon"] == pytest.approx(math.log((q - 1e-5) / (1 - q)), rel=1e-6)
    assert check["empirical_epsilon_lower_bound"] == pytest.approx(check["max_refutable_epsilon"], rel=1e-6)
    summary = {
        **_summary(1.0, (1.0, 1.0), m=n),
        "dp_bound": {"respected": check["respected"], "attacks": {"loss": check}},
    }
    status, text = evidence.membership(summary, 3.0, 1e-5, 0.6)
    assert status == "fail" and "VIOLATE" in text and check["correction"] in text
    # A violation that per-pair 95% bounds called significant is not one at the family-wise level: 24 of 40
    # members above every non-member at epsilon 0.9 (TPR_lo 0.43 > e^0.9 x FPR_hi 0.09 + delta at 95% per pair).
    labels = np.r_[np.ones(40), np.zeros(40)].astype(int)
    scores = np.r_[np.full(24, 2.0), np.zeros(16), np.linspace(-1, 1, 40)]
    check = membership.dp_bound_check(labels, scores, 0.9, 1e-5)
    assert check["respected"] and check["significant_violations"] == 0, check

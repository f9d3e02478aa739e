"""The membership audit's DP-bound check: which thresholds it tests and at what per-test significance.

Kept apart from membership.py (torch, scikit-learn) so the checklist's evidence can count the targets a claim needs
without importing the attacks. The check maximises the empirical epsilon over the attacks and a threshold grid fixed
before the scores are seen, so each test runs at the family-wise level divided by attacks x thresholds (Bonferroni).
"""

from __future__ import annotations

import numpy as np

AUDIT_ATTACKS = ("loss", "lira_offline", "rmia")
DP_CONFIDENCE = 0.95  # family-wise, over every attack and every threshold the empirical epsilon is maximised over


def fp_levels(n_neg: int) -> np.ndarray:
    """The false-positive counts the DP-bound check tests, fixed before the scores are seen: 0 and the powers of
    two below ``n_neg`` (0, 1, 2, 4, ..., 256 for 360 non-members: 10 thresholds). Low FPR is where a DP bound is
    refuted; a geometric grid keeps the Bonferroni factor to ~log2(n) instead of one test per measured pair."""
    return np.r_[0, 2 ** np.arange(max(int(n_neg - 1).bit_length(), 0))].astype(np.int64)


def dp_level(n_neg: int, attacks: int = len(AUDIT_ATTACKS), confidence: float = DP_CONFIDENCE) -> float:
    """The significance of one (attack, threshold) test: Bonferroni over ``attacks`` x ``len(fp_levels(n_neg))``."""
    return (1 - confidence) / (attacks * len(fp_levels(n_neg)))


def correction_words(attacks: int, thresholds: int, confidence: float = DP_CONFIDENCE) -> str:
    """How the DP-bound check's level is stated in the report."""
    return (
        f"{confidence:.0%} family-wise, Clopper-Pearson, Bonferroni over {attacks} attack(s) x {thresholds} thresholds"
    )

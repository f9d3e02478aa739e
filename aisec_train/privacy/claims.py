"""Whether a DP run's claim is a guarantee: the accountant's epsilon is one only when nothing voids it.

Two settings void it whatever the accountant says, and the DP checklist item fails with the reason:
``privacy.reproducible_noise=true`` (the noise and batches follow ``train.seed``, which the report publishes) and a
``privacy.delta`` at or above 1/n_train (such a delta allows a mechanism that releases a whole record; a
``privacy.delta_reason`` records why it was used, it does not make it private). Poisson sampling is not a gap: its
absence is refused (train/config.py).

    >>> gaps = guarantee_gaps(PrivacyConfig(delta=0.5, delta_reason="debug"), n_train=1437)
    >>> dp_item(True, "(2.99, 0.5)-DP ...", gaps)[0]
    'fail'
"""

from __future__ import annotations

from typing import Any


def guarantee_gaps(privacy: Any, n_train: int) -> list[str]:
    """Why the run's (epsilon, delta) is not a DP guarantee (empty: it is one)."""
    gaps = []
    if getattr(privacy, "reproducible_noise", False):
        gaps.append(
            "privacy.reproducible_noise=true: the noise and Poisson batches follow train.seed, so anyone who knows "
            "the seed and the other records can replay training with and without a record"
        )
    if n_train > 0 and privacy.delta >= 1.0 / n_train:
        why = getattr(privacy, "delta_reason", None)
        gaps.append(
            f"privacy.delta={privacy.delta:g} >= 1/n_train = {1.0 / n_train:.3g}: such a delta allows releasing whole "
            "records" + (f" (reason recorded: {why})" if why else "")
        )
    return gaps


def guarantee(gaps: list[str]) -> dict[str, Any]:
    """``privacy.guarantee`` for the report; the model card and security report read ``holds``."""
    return {"holds": not gaps, "gaps": gaps}


# What a DP run releases besides the weights, computed from the training records without noise: the guarantee
# (the accountant's epsilon) covers the weights and what is computed from them on other data, not these. Opacus'
# own examples print the same training loss; here the report says so instead of letting the epsilon seem to cover
# every file of the run folder.
NOT_COVERED = [
    "training loss and accuracy per epoch and step (metrics.csv, training_curve.png, trackers): averages over the "
    "private batches (an accuracy's denominator gives the number of records the Poisson draws put in them)",
    "the clip fraction per step (trackers, logger.every_n_steps): the share of each private batch's per-sample "
    "gradients whose norm exceeded privacy.max_grad_norm",
    "the data section's counts, class balance, sanity findings and manifest hash of the training split",
    "audit and defence figures computed on training records (membership attack scores, backdoor detection)",
]


def dp_item(within_target: bool, evidence: str, gaps: list[str]) -> tuple[str, str]:
    """(status, evidence) of the checklist item "differentially private training (DP-SGD)"."""
    if gaps:
        return "fail", "NO DP guarantee holds: " + "; ".join(gaps) + f". Accountant's figures: {evidence}"
    return ("pass" if within_target else "fail"), evidence

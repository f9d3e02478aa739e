"""Backdoor metrics: clean accuracy, attack success rate (ASR), robust accuracy on triggered inputs (RA), DER, and
how much of the ASR the model's errors alone explain (:func:`errors_to_target`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from scipy.stats import binomtest
from torch import nn
from torch.utils.data import Dataset

from aisec_train.train.loop import accuracy


@dataclass(frozen=True)
class BackdoorMetrics:
    clean_accuracy: float  # on the clean test split
    asr: float  # triggered test inputs classified as the attacker's label
    robust_accuracy: float  # triggered test inputs classified as their true label (RA)
    n_triggered: int = 0  # triggered test inputs the two rates above are over

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(model: nn.Module, clean: Dataset, attack: Dataset, truth: Dataset, device: torch.device) -> BackdoorMetrics:
    """The three rates, each streamed through a DataLoader (``attack``/``truth``: badnets.triggered views)."""
    return BackdoorMetrics(
        accuracy(model, clean, device), accuracy(model, attack, device), accuracy(model, truth, device), len(attack)
    )


def errors_to_target(m: BackdoorMetrics, num_classes: int) -> dict[str, float | int | None]:
    """Does the target get more of the model's mistakes on triggered inputs than chance gives it?

    A triggered input the model gets wrong lands on one of the ``K - 1`` labels other than its own, the attacker's
    among them; with no backdoor the attacker's label takes about ``1 / (K - 1)`` of those errors (less when the
    errors lean elsewhere). So a model that is right on a fraction RA of triggered inputs shows an ASR near
    ``(1 - RA) / (K - 1)`` from its errors alone: about 0.04 for a 10-class model at RA 0.6, against a bar of 0.05.
    The one-sided binomial test (scipy) asks whether the attacker's share of the errors is above that chance share;
    a small p says the trigger still steers the model, a large one that the ASR left is the model's error rate.
    """
    errors = round((1.0 - m.robust_accuracy) * m.n_triggered)
    to_target = min(errors, round(m.asr * m.n_triggered))
    chance = 1.0 / max(1, num_classes - 1)
    test = binomtest(to_target, errors, chance, alternative="greater") if errors else None
    return {
        "errors": errors,
        "to_target": to_target,
        "share": to_target / errors if errors else None,
        "chance_share": chance,
        "asr_from_errors": (1.0 - m.robust_accuracy) * chance,
        "p_value": float(test.pvalue) if test is not None else None,
    }


def der(before: BackdoorMetrics, after: BackdoorMetrics) -> float:
    """Defence effectiveness rating (BackdoorBench): (max(0, dASR) - max(0, dACC) + 1) / 2, in [0, 1].

    dASR and dACC are drops (before - after); 1 means the attack is gone at no clean-accuracy cost.
    """
    d_asr = before.asr - after.asr
    d_acc = before.clean_accuracy - after.clean_accuracy
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0

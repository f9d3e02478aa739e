"""Backdoor metrics: clean accuracy, attack success rate (ASR), robust accuracy on triggered inputs (RA), DER."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from aisec_train.train.loop import accuracy


@dataclass(frozen=True)
class BackdoorMetrics:
    clean_accuracy: float  # on the clean test split
    asr: float  # triggered test inputs classified as the attacker's label
    robust_accuracy: float  # triggered test inputs classified as their true label (RA)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(model: nn.Module, clean: Dataset, attack: Dataset, truth: Dataset, device: torch.device) -> BackdoorMetrics:
    """The three rates, each streamed through a DataLoader (``attack``/``truth``: badnets.triggered views)."""
    return BackdoorMetrics(
        accuracy(model, clean, device), accuracy(model, attack, device), accuracy(model, truth, device)
    )


def der(before: BackdoorMetrics, after: BackdoorMetrics) -> float:
    """Defence effectiveness rating (BackdoorBench): (max(0, dASR) - max(0, dACC) + 1) / 2, in [0, 1].

    dASR and dACC are drops (before - after); 1 means the attack is gone at no clean-accuracy cost.
    """
    d_asr = before.asr - after.asr
    d_acc = before.clean_accuracy - after.clean_accuracy
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0

"""Evasion: FGSM / PGD attacks, adversarial-training adversaries and robust accuracy."""

from .adversary import Adversary, adversary_from_config, make_adversary, robust_accuracy
from .attacks import attack_mode, fgsm, graphed_pgd, pgd

__all__ = [
    "Adversary",
    "adversary_from_config",
    "attack_mode",
    "fgsm",
    "graphed_pgd",
    "make_adversary",
    "pgd",
    "robust_accuracy",
]

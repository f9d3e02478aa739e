"""Evasion: FGSM / PGD attacks, adversarial-training adversaries and robust accuracy.

The names below load on first use (PEP 562), so ``aisec_train.robust.config`` (read when the CLI checks a
config) does not import torch: a bad override is refused in about a second, not after the heavy imports.
"""

from importlib import import_module

_EXPORTS = {
    "Adversary": "adversary",
    "adversary_from_config": "adversary",
    "make_adversary": "adversary",
    "robust_accuracy": "adversary",
    "attack_mode": "attacks",
    "fgsm": "attacks",
    "graphed_pgd": "attacks",
    "pgd": "attacks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

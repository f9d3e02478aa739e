"""Adversarial training's inner maximisation and robust evaluation.

``make_adversary(mode, ...)`` returns the callable the training loop applies to every batch before its (DP)
optimiser step: ``x_adv = adversary(model, x, y)``. Each call draws a fresh random-start seed from torch's
global generator, so a seeded run is reproducible while batches get independent starts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from aisec_kernels import pgd_update, random_start
from torch import Tensor, nn

from aisec_train.robust.config import RobustnessConfig

from .attacks import HI, LO, attack_mode, fgsm, input_gradient, pgd
from .outcome import check_inputs

Adversary = Callable[[nn.Module, Tensor, Tensor], Tensor]
MODES = ("none", "pgd_at", "fgsm_rs")


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def make_adversary(
    mode: str,
    *,
    eps: float,
    step_size: float | None = None,
    steps: int = 10,
    norm: str = "linf",
    backend: str = "auto",
) -> Adversary | None:
    """``"pgd_at"``: Madry PGD with random start (default step ``2.5 * eps / steps``); ``"fgsm_rs"``: Wong
    et al. (2020) fast AT, a uniform random start then one projected step (default ``1.25 * eps``);
    ``"none"``: None."""
    if mode not in MODES:
        raise ValueError(f"robustness mode {mode!r} is unknown; choose one of {MODES}")
    if mode == "none":
        return None
    if mode == "pgd_at":
        alpha = step_size if step_size is not None else 2.5 * eps / steps

        def pgd_adversary(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            check_inputs(x)  # outside [0, 1] the clamp would train on other images than the batch's
            return pgd(
                model,
                x,
                y,
                eps=eps,
                step_size=alpha,
                steps=steps,
                norm=norm,
                backend=backend,
                seed=_fresh_seed(),
            )

        return pgd_adversary
    alpha = step_size if step_size is not None else 1.25 * eps

    def fgsm_rs_adversary(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        check_inputs(x)
        x_nat = x.detach()
        x0 = random_start(x_nat, eps=eps, norm=norm, lo=LO, hi=HI, seed=_fresh_seed(), backend=backend)
        with attack_mode(model):
            grad, _ = input_gradient(model, x0, y, targeted=False, autocast_bf16=False)
        return pgd_update(x0, x_nat, grad, eps=eps, step_size=alpha, norm=norm, lo=LO, hi=HI, backend=backend)

    return fgsm_rs_adversary


def adversary_from_config(cfg: RobustnessConfig) -> Adversary | None:
    """The training adversary a ``robustness`` config asks for (None for ``mode=none``)."""
    return make_adversary(
        cfg.mode.value, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, norm=cfg.norm.value, backend=cfg.backend
    )


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor) -> int:
    with attack_mode(model):
        return int((model(x).argmax(dim=1) == y).sum())


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    name: str = "pgd",
    norm: str = "linf",
    eps: float,
    step_size: float,
    steps: int,
    restarts: int = 1,
    batch_size: int = 512,
    backend: str = "auto",
) -> float:
    """Accuracy on adversarial inputs from attack ``name`` ("pgd" or "fgsm"), in [0, 1].

    PGD runs with early stop: a sample that is already misclassified stays so, which can only lower the
    figure.
    """
    if name not in ("pgd", "fgsm"):
        raise ValueError(f"attack name {name!r} is unknown; choose 'pgd' or 'fgsm'")
    if len(x) == 0:
        raise ValueError("robust_accuracy needs at least one sample")
    check_inputs(x, y)
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        if name == "fgsm":
            x_adv = fgsm(model, xb, yb, eps=eps, norm=norm, backend=backend)
        else:
            x_adv = pgd(
                model,
                xb,
                yb,
                eps=eps,
                step_size=step_size,
                steps=steps,
                norm=norm,
                restarts=restarts,
                early_stop=True,
                backend=backend,
                seed=start,
            )
        correct += _correct(model, x_adv, yb)
    return correct / len(x)

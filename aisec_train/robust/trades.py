"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, ICML 2019): adversarial training that trades natural
for robust error explicitly, as a training objective of the one loop (``aisec_train/train/objectives.py``).

Inner maximisation (the model in attack mode: eval, Opacus hooks off, parameters frozen), from
``x + 0.001 * N(0, I)``::

    x_adv <- P(x_adv + step * d(grad_x KL(softmax f(x) || softmax f(x_adv))))   (steps times)

with the fused ``pgd_update`` kernel (``d`` = sign for Linf, unit-L2 for L2; ``P`` projects onto the eps-ball
and [0, 1]). The outer loss, on the training model::

    CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv))      (both averaged over the batch)

Both terms are means over the batch (the KL is ``batchmean``, as the reference's ``sum / batch_size``), so the
loss is ``(1/B) sum_i l_i`` like ``CrossEntropyLoss``: Opacus' ``loss_reduction="mean"`` scaling stays right,
and in its hooks mode (and book-keeping) each record's per-sample gradient is the sum of its clean and
adversarial contributions before it is clipped. Opacus' ghost clipping norms each forward pass on its own, so
it cannot clip TRADES' two passes per record: the config refuses that pairing and so does :meth:`Trades.__call__`.

>>> objective = Trades(eps=0.1, step_size=0.02, steps=10, beta=6.0)  # doctest: +SKIP
>>> loss, logits = objective(model, attacked, x, y, nn.CrossEntropyLoss())  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import torch
from aisec_kernels import pgd_update
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from aisec_train.errors import ConfigError, require

from .attacks import HI, LO, attack_mode, loss_gradient
from .outcome import check_attack_args, check_inputs, generator


def _kl_rows(logits_adv: Tensor, p_nat: Tensor) -> Tensor:
    """Per-sample KL(p_nat || softmax(logits_adv))."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), p_nat, reduction="none").sum(1)


def trades_perturb(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    seed: int = 0,
    x_init: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """TRADES' KL-PGD: the point of the eps-ball whose prediction differs most (in KL) from the clean one.

    ``x_init`` replaces the seeded ``x + 0.001 * N(0, I)`` start (clamped to [0, 1], which the reference does
    only after its first step).
    """
    check_attack_args(eps=eps, norm=norm, steps=steps)
    check_inputs(x)  # outside [0, 1] the clamp moved the start and every step off the batch's own images
    x_nat = x.detach()
    with attack_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x_nat).float(), dim=1)
        if x_init is None:
            noise = torch.randn(x_nat.shape, generator=generator(seed, x_nat.device), device=x_nat.device)
            x_init = x_nat + 0.001 * noise.to(x_nat.dtype)
        x_adv = x_init.detach().clamp(LO, HI)
        for _ in range(steps):
            grad, _, _ = loss_gradient(model, x_adv, p_nat, _kl_rows)
            x_adv = pgd_update(
                x_adv, x_nat, grad, eps=eps, step_size=step_size, norm=norm, lo=LO, hi=HI, backend=backend
            )
    return x_adv


def _forward_both(model: nn.Module, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    if isinstance(model, DDP):
        # DDP's reducer expects one forward per backward: run the two halves as one batch. The models here
        # normalise per sample (GroupNorm), so this equals two forwards; without DP nothing is per-sample.
        return model(torch.cat([x, x_adv])).chunk(2)
    return model(x), model(x_adv)  # Opacus' hooks accumulate each record's two per-sample contributions


def trades_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, *, beta: float) -> tuple[Tensor, Tensor]:
    """``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (batch means) and the clean logits; gradients flow through
    both forward passes, the clean distribution included, as in the reference."""
    logits, logits_adv = _forward_both(model, x, x_adv.detach())
    natural = F.cross_entropy(logits, y)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return natural + beta * robust, logits


class Trades:
    """The TRADES training objective: ``objective(model, attacked, x, y, criterion) -> (loss, clean logits)``.

    ``perturb`` and ``loss`` are the two halves, for callers that attack and train separately. Each call draws
    a fresh start seed from torch's global generator, so a seeded run is reproducible and batches differ.
    """

    name, forwards = "trades", 2

    def __init__(
        self,
        *,
        eps: float,
        step_size: float,
        steps: int = 10,
        norm: str = "linf",
        beta: float = 6.0,
        backend: str = "auto",
    ):
        check_attack_args(eps=eps, norm=norm, steps=steps)
        ok = isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0
        require(ok, "robustness.step_size", step_size, "must be a finite number > 0")
        require(beta >= 0, "robustness.beta", beta, "must be >= 0")
        self.eps, self.step_size, self.steps, self.norm, self.beta, self.backend = (
            eps,
            step_size,
            steps,
            norm,
            beta,
            backend,
        )

    @classmethod
    def from_config(cls, cfg: Any) -> Trades:
        """From a resolved ``robustness`` config (``mode=trades``): eps, step_size, steps, norm, beta, backend."""
        return cls(
            eps=cfg.eps,
            step_size=cfg.step_size,
            steps=cfg.steps,
            norm=cfg.norm.value,
            beta=cfg.beta,
            backend=cfg.backend,
        )

    def perturb(self, attacked: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        kw = dict(eps=self.eps, step_size=self.step_size, steps=self.steps, norm=self.norm, backend=self.backend)
        return trades_perturb(attacked, x, seed=seed, **kw)

    def loss(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return trades_loss(model, x, x_adv, y, beta=self.beta)

    def __call__(
        self, model: nn.Module, attacked: nn.Module, x: Tensor, y: Tensor, criterion: Any = None
    ) -> tuple[Tensor, Tensor]:
        if isinstance(criterion, DPLossFastGradientClipping):  # Opacus' ghost-clipping loss wrapper
            raise ConfigError(
                "privacy.grad_sample_mode='ghost' is not allowed with robustness=trades: ghost clipping norms each "
                "forward pass on its own and TRADES feeds every record twice; allowed: bk or hooks"
            )
        x_adv = self.perturb(attacked, x, y)
        model.train()  # the attack ran the model in eval mode
        return self.loss(model, x, x_adv, y)

"""``PrivacyEngine.make_private(..., grad_sample_mode="bk")``: Opacus' engine with a book-keeping model.

Everything but the model is Opacus' own: the Poisson ``DPDataLoader``, ``DPOptimizerFastGradientClipping``
(the optimizer of its ghost mode, which expects ``p.grad`` to hold the clipped sum and adds the noise), the
accountant hook. So the privacy mechanism and the ledger are exactly ghost mode's; only how ``p.grad`` is
formed differs (one backward instead of two). The call returns ``(model, optimizer, criterion, loader)``
like ghost mode; the criterion is the caller's own (book-keeping needs no loss wrapper, so any loss built
from the model's outputs works, TRADES' included). A model book-keeping cannot run falls back to Opacus'
ghost or hooks mode; :func:`~aisec_train.train.bk.bk_report` tells which, and why.

    engine = BKPrivacyEngine(accountant="prv")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
        noise_multiplier=1.1, max_grad_norm=1.0, grad_sample_mode="bk",
    )
    loss = criterion(model(x), y); loss.backward(); optimizer.step()
"""

from __future__ import annotations

import logging
from functools import partial

from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from aisec_train.train.bk import BKGradSampleModule, BKUnsupported, finite_clip_factors
from aisec_train.train.bk_uses import check_first_forward

log = logging.getLogger(__name__)


class BKPrivacyEngine(PrivacyEngine):
    """Opacus' ``PrivacyEngine`` that also accepts ``grad_sample_mode="bk"`` (see the module docstring)."""

    def make_private(self, *, module: nn.Module, grad_sample_mode: str = "hooks", bk_fallback: str = "ghost", **kwargs):
        """Opacus' ``make_private``; with ``grad_sample_mode="bk"`` always four values back. ``bk_fallback`` is
        the Opacus mode a model book-keeping cannot run falls back to: ``"ghost"``, or ``"hooks"`` where ghost
        cannot serve (several forwards per step, as TRADES: ghost norms each forward on its own)."""
        if grad_sample_mode != "bk":
            return super().make_private(module=module, grad_sample_mode=grad_sample_mode, **kwargs)
        if bk_fallback not in ("ghost", "hooks"):
            raise ValueError(f"bk_fallback={bk_fallback!r} is not allowed: choose 'ghost' or 'hooks'")
        criterion = kwargs.get("criterion", nn.CrossEntropyLoss())
        reduction = kwargs.get("loss_reduction", "mean")
        if getattr(criterion, "reduction", reduction) != reduction:
            raise ValueError(f"criterion.reduction={criterion.reduction!r} must equal loss_reduction={reduction!r}")
        if kwargs.get("clipping", "flat") != "flat" or not kwargs.get("wrap_model", True):
            reason = "book-keeping implements flat clipping of a wrapped model"
            return self._fall_back(module, bk_fallback, reason, kwargs)
        try:
            model, optimizer, loader = super().make_private(module=module, grad_sample_mode="bk", **kwargs)
        except BKUnsupported as unsupported:
            mode = "hooks" if "hooks" in (unsupported.fallback, bk_fallback) else "ghost"
            return self._fall_back(module, mode, unsupported.reason, kwargs)
        return model, optimizer, criterion, loader

    def _fall_back(self, module: nn.Module, mode: str, reason: str, kwargs: dict):
        log.warning("grad_sample_mode=bk falls back to Opacus' %s mode: %s", mode, reason)
        wrapped = super().make_private(module=module, grad_sample_mode=mode, **kwargs)
        if mode == "ghost":
            model, optimizer, criterion, loader = wrapped
        else:
            (model, optimizer, loader), criterion = wrapped, kwargs.get("criterion", nn.CrossEntropyLoss())
        model.bk_fallback = reason  # read by bk_report
        return model, optimizer, criterion, loader

    def _prepare_model(self, module: nn.Module, *, grad_sample_mode: str = "hooks", **kwargs):
        if grad_sample_mode != "bk":
            model = super()._prepare_model(module, grad_sample_mode=grad_sample_mode, **kwargs)
            if isinstance(model, GradSampleModuleFastGradientClipping):  # ghost, bk's fallback, DPDDP, FSDP
                model.get_clipping_coef = partial(_finite_clipping_coef, model)
        else:
            self.validate(module=module, optimizer=None, data_loader=None)  # Opacus' ModuleValidator (no BatchNorm...)
            model = BKGradSampleModule(
                module,
                max_grad_norm=kwargs.get("max_grad_norm", 1.0),
                batch_first=kwargs.get("batch_first", True),
                loss_reduction=kwargs.get("loss_reduction", "mean"),
            )
        if grad_sample_mode != "ghost_fsdp":  # what per-sample clipping cannot bound, refused at the first forward
            check_first_forward(model, module)
        return model

    def _prepare_optimizer(self, *, grad_sample_mode: str = "hooks", **kwargs):
        # p.grad arrives as the clipped sum, which is what ghost mode's optimizer expects.
        return super()._prepare_optimizer(
            grad_sample_mode="ghost" if grad_sample_mode == "bk" else grad_sample_mode, **kwargs
        )


def _finite_clipping_coef(model: GradSampleModuleFastGradientClipping):
    """Opacus ghost mode's clip factors with bk's rule for a non-finite norm: 0, that record dropped from this step
    (train/bk.py, ``finite_clip_factors``; Opacus' own formula gave one record's NaN norm to the whole step)."""
    return finite_clip_factors(model.get_norm_sample(), model.max_grad_norm)

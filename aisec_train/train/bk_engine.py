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
import math
from functools import partial

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from aisec_train.privacy.noise import flat_secure_noise
from aisec_train.train.bk import BKGradSampleModule, BKUnsupported, finite_clip_factors
from aisec_train.train.bk_uses import check_first_forward
from aisec_train.train.callbacks import NonFiniteError

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
        optimizer = super()._prepare_optimizer(
            grad_sample_mode="ghost" if grad_sample_mode == "bk" else grad_sample_mode, **kwargs
        )
        if not isinstance(optimizer, DPOptimizerFastGradientClipping):  # hooks (also bk's fallback, DDP) clips rows
            _drop_non_finite_records(optimizer)
        elif grad_sample_mode == "ghost":  # also bk's fallback and data-parallel runs
            _stop_on_a_non_finite_step(optimizer)
        flat_secure_noise(optimizer)  # Opacus' noise, drawn per group of tensors (privacy/noise.py)
        _accumulate_by_clone(optimizer)
        return optimizer


def _accumulate_by_clone(optimizer: DPOptimizer) -> None:
    """Ghost mode's (and bk's) ``accumulate`` with a plain clone where Opacus ``copy.deepcopy``s each clipped sum:
    the same copy, without deepcopy's Python per tensor (0.007 of the small ``cnn``'s step, docs/privacy.md)."""
    if getattr(type(optimizer), "accumulate", None) is not DPOptimizerFastGradientClipping.accumulate:
        return

    def accumulate():
        for p in optimizer.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.detach().clone()

    optimizer.accumulate = accumulate


def _finite_clipping_coef(model: GradSampleModuleFastGradientClipping):
    """Opacus ghost mode's clip factors with bk's rule for a non-finite norm: 0, that record dropped from this step
    (train/bk.py, ``finite_clip_factors``; Opacus' own formula gave one record's NaN norm to the whole step)."""
    return finite_clip_factors(model.get_norm_sample(), model.max_grad_norm)


def _drop_non_finite_records(optimizer: DPOptimizer) -> None:
    """Hooks mode's clipped sum with bk's rule for a non-finite norm: that record's rows of every ``p.grad_sample``
    are zeroed and Opacus clips again, so it contributes exactly 0 and the step is the step without it.

    A record whose forward overflows (a pixel of 3e38 through ``2x - 1``) has inf and NaN per-sample gradients, and
    Opacus' factor for a NaN norm is NaN: a zero factor alone would not do either, since ``0 * inf`` is NaN in the
    clipped sum. Opacus clips first; only a non-finite clipped sum (a sync and one pass over the parameters) sends
    the step through the drop, so an ordinary step computes the per-sample norms once, not twice. A record whose
    norm alone overflowed (finite rows) already got Opacus' factor 0, as the drop would give it. Row-wise and in
    place (a list of several backwards' tensors keeps its shape, which Opacus counts); under ``train.augmult`` it
    runs after a record's views are averaged (augmult.py wraps this method later)."""
    clip_and_accumulate = optimizer.clip_and_accumulate

    def clip_then_drop():
        before = [None if p.summed_grad is None else p.summed_grad.clone() for p in optimizer.params]
        clip_and_accumulate()
        sums = [p.summed_grad for p in optimizer.params if p.summed_grad is not None]
        if not sums or bool(torch.stack([torch.isfinite(s).all() for s in sums]).all()):
            return  # a sync, as the loop's own loss.item()
        for p, summed in zip(optimizer.params, before, strict=True):
            p.summed_grad = summed  # as before this backward's clip (several backwards may accumulate)
        samples = [getattr(p, "grad_sample", None) for p in optimizer.params]
        pieces = [s if isinstance(s, list) else [s] for s in samples if s is not None]
        # Opacus' norms; reshaped by size, not -1, which an empty Poisson batch's 0 rows leave ambiguous
        norms = [torch.cat([g.reshape(len(g), math.prod(g.shape[1:])).norm(dim=-1) for g in gs]) for gs in pieces]
        dropped = ~torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms], dim=1).norm(2, dim=1))
        for gs in pieces:
            for g, rows in zip(gs, dropped.split([len(g) for g in gs]), strict=True):
                g.masked_fill_(rows.to(g.device).view(-1, *[1] * (g.dim() - 1)), 0)
                g.__dict__.pop("_processed", None)  # Opacus' used-once mark: this clip is redone, not reused
        clip_and_accumulate()

    optimizer.clip_and_accumulate = clip_then_drop


def _stop_on_a_non_finite_step(optimizer: DPOptimizerFastGradientClipping) -> None:
    """Ghost mode cannot drop a record whose forward overflows: stop before its non-finite step, in one clear line.

    Its clip factor is 0 (``_finite_clipping_coef``), but Opacus' second backward runs through the whole batch's
    graph, where the weight gradients multiply that record's inf activations by its zero upstream gradient: NaN in
    every parameter, even with the record's loss left out of the backward altogether. Dropping it exactly needs its
    per-sample gradients (``hooks``, ``bk``) or a forward without it. The check reads the noised (and, data-parallel,
    all-reduced) step the inner optimizer is about to apply, as the loop's weight check would after it, so every
    rank stops alike and it releases nothing more; the stop's step still tells when the record was drawn
    (docs/privacy.md)."""

    def check(*_):
        grads = [p.grad for p in optimizer.params if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            raise NonFiniteError(
                "training stopped: the private step became non-finite under Opacus' ghost clipping (privacy."
                "grad_sample_mode=ghost, or bk's fallback to it in data-parallel runs and for models bk cannot run), "
                "which cannot drop a record whose forward overflows (non-finite activations); the step was not "
                "applied and the last good checkpoint is kept. Allowed: privacy.grad_sample_mode=hooks (or bk in "
                "one process), which drops such a record, or data scaled so the forward stays finite"
            )

    optimizer.original_optimizer.register_step_pre_hook(check)  # after the noise (and DDP's all-reduce)

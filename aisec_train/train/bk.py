"""Book-keeping DP-SGD (Bu, Wang, Zha & Karypis, ICML 2023): per-sample clipping in one backward pass.

:class:`BKGradSampleModule` wraps a model like Opacus' GradSampleModule. In training mode each supported
layer runs through :mod:`~aisec_train.train.bk_capture`, so one ``loss.backward()`` yields, per layer, the
inputs and output gradients (and per-sample norms as soon as a layer's gradients arrive); at the end of that
same backward the per-sample clip factors ``c_i = min(1, C / (||g_i|| + 1e-6))`` (Opacus' formula) are
formed and each layer writes ``sum_i c_i g_i`` into ``p.grad``. Opacus' ``DPOptimizerFastGradientClipping``
then adds the noise, scales, steps and charges the accountant, exactly as in its ghost mode.

>>> import torch
>>> from torch import nn
>>> net = BKGradSampleModule(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), max_grad_norm=1.0)
>>> nn.functional.cross_entropy(net(torch.randn(5, 4)), torch.tensor([0, 1, 0, 1, 1])).backward()
>>> net.per_sample_gradient_norms.shape, bk_report(net)["layers"]
(torch.Size([5]), {'0': 'ghost', '2': 'ghost'})
"""

from __future__ import annotations

from functools import partial

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from torch import Tensor, nn

from aisec_train.errors import ConfigError
from aisec_train.train.bk_capture import LayerRecord, run_op, tap
from aisec_train.train.bk_norms import OpacusRule, rule_for
from aisec_train.train.bk_uses import refuse_outside_use


class BKUnsupported(Exception):
    """The model cannot run in book-keeping mode; ``fallback`` names the Opacus mode that can."""

    def __init__(self, reason: str, fallback: str):
        super().__init__(reason)
        self.reason, self.fallback = reason, fallback


def plan(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers holding trainable parameters; raises :class:`BKUnsupported` when book-keeping cannot run."""
    owners: dict[int, str] = {}
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (DPRNN, DPLSTM, DPGRU)):
            raise BKUnsupported(f"layer {name!r} is an Opacus {type(module).__name__}", "hooks")
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        for p in params:
            if id(p) in owners:  # tied weights: per-sample norms would need cross-layer terms
                raise BKUnsupported(f"a parameter is shared by layers {owners[id(p)]!r} and {name!r}", "hooks")
            owners[id(p)] = name
        if params and rule_for(module) is None:
            reason = f"layer {name!r} ({type(module).__name__}) has no book-keeping rule and no Opacus grad sampler"
            raise BKUnsupported(reason, "ghost")
        if params:
            layers.append((name, module))
    return layers


class BKGradSampleModule(AbstractGradSampleModule):
    """A model whose backward leaves the sum of clipped per-sample gradients in ``p.grad`` (see module doc)."""

    def __init__(
        self,
        m: nn.Module,
        *,
        max_grad_norm: float,
        batch_first: bool = True,
        loss_reduction: str = "mean",
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"loss_reduction={loss_reduction!r} is not allowed: choose 'mean' or 'sum'")
        if not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={max_grad_norm!r} is not allowed: must be one number > 0")
        if not batch_first:
            raise BKUnsupported("batch_first=False", "ghost")
        layers = plan(m)
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.max_grad_norm = float(max_grad_norm)
        self.hooks_enabled = False
        self.grad_accumulation_allowed = True
        self.per_sample_gradient_norms: Tensor | None = None
        self._queued = False
        self.records: dict[str, LayerRecord] = {}
        for name, module in layers:
            params = dict(module.named_parameters(recurse=False))
            record = LayerRecord(name, module, rule_for(module), self, params)
            self.records[name] = record
            module.forward = partial(_forward, record, module.forward)  # undone by remove_hooks()
        # Book-keeping gives a layer's parameters their gradient itself: autograd never should. One that does was
        # used outside its layer's forward (F.linear(h, emb.weight), x @ lin.weight.T): that use is in no
        # per-sample norm, and its full-batch gradient, unclipped, was added to the clipped sum (one record moved
        # the step by 500 C). Refused at any backward, before its step (the first forward is watched too: bk_uses.py).
        self._outside_use = [
            p.register_hook(partial(_outside_use, self, f"{name}.{k}" if name else k))
            for name, record in self.records.items()
            for k, p in record.params.items()
            if p.requires_grad
        ]
        self.enable_hooks()

    def forward(self, *args, **kwargs):
        if self._queued:  # the last backward raised before its end: drop what it left behind
            self._queued = False
            for record in self.records.values():
                record.reset()
        return self._module(*args, **kwargs)

    # -- Opacus' GradSampleModule interface (the optimizer, BatchMemoryManager and attack_mode use it)
    def enable_hooks(self) -> None:
        self.hooks_enabled = True

    def disable_hooks(self) -> None:
        self.hooks_enabled = False

    def remove_hooks(self) -> None:
        self.disable_hooks()
        for handle in getattr(self, "_outside_use", ()):
            handle.remove()
        for record in getattr(self, "records", {}).values():
            record.module.__dict__.pop("forward", None)
            record.reset()

    def forbid_grad_accumulation(self) -> None:
        self.grad_accumulation_allowed = False

    def allow_grad_accumulation(self) -> None:
        self.grad_accumulation_allowed = True

    # -- the end of the backward pass
    def backward_started(self) -> None:
        """Called by the first layer whose gradient arrives: clip once this backward pass has finished."""
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._clip)

    def _clip(self) -> None:
        self._queued = False
        try:
            self._write_clipped_sum()
        finally:  # whatever happened, the next step starts clean
            for record in self.records.values():
                record.reset()

    def _write_clipped_sum(self) -> None:
        for record in self.records.values():
            if record.calls and record.processed is None:
                record.process()  # a layer some of whose forward calls never got a gradient
        active = [r for r in self.records.values() if r.processed is not None]
        if not active:
            return
        sizes = {r.processed.norm_sq.shape[0] for r in active}
        if len(sizes) > 1:
            raise ValueError(f"bk: layers saw different batch sizes {sorted(sizes)} in one step")
        device = active[0].processed.norm_sq.device
        # With a mean loss each captured gradient is 1/B of the sample's own (Opacus' hooks scale by B too).
        scale = float(sizes.pop()) if self.loss_reduction == "mean" else 1.0
        # clamp: a ghost norm's Gram sums can round a zero norm to a tiny negative (Opacus' ghost norms clamp too)
        norms = torch.stack([r.processed.norm_sq.to(device) for r in active]).sum(0).clamp(min=0).sqrt() * scale
        self.per_sample_gradient_norms = norms
        weights = finite_clip_factors(norms, self.max_grad_norm) * scale
        dropped = ~torch.isfinite(norms)
        if bool(dropped.any()):  # a record whose forward overflowed: its zero factor times its inf rows is NaN
            for record in active:
                record.drop_rows(dropped)
        for record in active:
            for p, grad in record.clipped(weights).items():
                grad = grad.to(p.dtype)
                p.grad = grad if p.grad is None else p.grad + grad
        for p in self._module.parameters():
            if p.requires_grad and p.grad is None:  # unused this step: Opacus' optimizer needs a tensor to noise
                p.grad = torch.zeros_like(p)


def finite_clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """Opacus' clip factors ``min(1, C / (||g_i|| + 1e-6))``, and 0 for a sample whose norm is not finite.

    One record can make its own norm NaN or inf: a pixel of 1e30 (a finite float32 the data checks pass) squares
    past float32 in a ghost norm, and ``inf * 0`` is NaN where tanh saturated the record's gradient to 0. Opacus'
    formula gave that sample a NaN factor, which the clipped sum spread to every parameter: one record made the
    step, and the model, non-finite, an influence no clip bounds, and training died at the step that drew it. A
    factor of 0 drops that record's gradient from this step alone: its contribution, 0, is within C like any
    clipped one, so the sum's sensitivity stays C and nothing of the other records' step depends on it. (Not
    counted in the report: how many records were dropped would be a statistic of the data with no noise.)
    """
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


def _outside_use(hub: BKGradSampleModule, name: str, grad: Tensor | None) -> None:
    """A gradient autograd delivered to a book-keeping layer's parameter: a use outside that layer (see __init__).

    A zero gradient carries no record's information (an empty batch runs the layer's own forward), so only a
    non-zero one is refused."""
    if hub.hooks_enabled and grad is not None and bool(grad.ne(0).any()):  # None: the layer's own op (no grad)
        raise refuse_outside_use(name)


def _forward(record: LayerRecord, original, *args, **kwargs):
    hub, module = record.hub, record.module
    active = hub.hooks_enabled and module.training and torch.is_grad_enabled() and not record.busy
    empty = bool(args) and isinstance(args[0], Tensor) and args[0].shape[0] == 0  # its gradient is exactly 0
    if not active or empty or not record.trainable():
        return original(*args, **kwargs)
    if not isinstance(record.rule, OpacusRule):
        if kwargs or len(args) != 1:
            raise TypeError(f"bk: layer {record.name!r} takes one positional input, got {len(args)} and {list(kwargs)}")
        return run_op(record, record.rule.prepare(module, args[0]))
    # Detached parameters: autograd computes no weight gradient here either; the sampler provides it.
    record.busy = True
    try:
        detached = {k: p.detach() for k, p in record.params.items()}
        out = torch.func.functional_call(module, detached, args, kwargs)
    finally:
        record.busy = False
    if not isinstance(out, Tensor):
        raise NotImplementedError(f"bk: layer {record.name!r} returns {type(out).__name__}; use grad_sample_mode=ghost")
    return tap(record, record.add_call(tuple(a.detach() for a in args if isinstance(a, Tensor))), out)


def bk_report(model: nn.Module) -> dict:
    """Which method each layer used at the last step (and why), or which Opacus mode the model fell back to.

    ``{"mode": "bk"|"ghost"|"hooks", "layers": {name: "ghost"|"instantiate"|"opacus:<sampler>"},
    "why": {name: reason}, "fallback": None | reason}``; a layer reads ``"pending"`` before its first step.
    """
    if isinstance(model, BKGradSampleModule):
        layers = {name: r.method or r.rule.static_method or "pending" for name, r in model.records.items()}
        why = {name: r.why or "" for name, r in model.records.items()}
        return {"mode": "bk", "layers": layers, "why": why, "fallback": None}
    mode = "ghost" if isinstance(model, GradSampleModuleFastGradientClipping) else "hooks"
    mode = mode if isinstance(model, (GradSampleModule, GradSampleModuleFastGradientClipping)) else "none"
    return {"mode": mode, "layers": {}, "why": {}, "fallback": getattr(model, "bk_fallback", None)}

"""What per-sample clipping cannot bound, refused at a private model's first training forward (before any step).

First, a parameter used outside the forward of the module that holds it. Opacus forms per-sample gradients (hooks
mode) or their norms (ghost mode) from what module hooks capture: each module's input and output gradient, turned
into the gradient of that module's *own* parameters. A model that reads a parameter elsewhere
(``F.linear(h, self.emb.weight)``, the usual tied output head; ``x @ self.fc.weight.T`` in another module's
forward) gives that parameter a gradient no hook sees. Ghost mode's norms left that use out
while its second backward added its gradient to the clipped sum: one record moved the step by 2.05 C (noise 0,
leave-one-out). Hooks mode dropped that use's gradient: a model trained on another gradient than the one reported.
Book-keeping added it, unclipped, to its clipped sum (500 C); it also refuses such a gradient at every backward
(train/bk.py). The first training forward of every mode runs under a ``TorchFunctionMode`` that sees each op a
parameter enters (then the watch is removed).

The same forward refuses a model whose buffers it changes (a running mean of the batch: see ``_check_buffers``),
and turns what Opacus' modes refuse only part-way into the run (a layer called twice under ghost clipping, an
in-place op on a hooked layer's output) into one line.

A module may use its own parameters anywhere in its forward, its submodules' calls included (Opacus' functorch
sampler differentiates that whole forward); tied weights between modules are the modules' own too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from aisec_train.errors import ConfigError


def refuse_outside_use(name: str) -> ConfigError:
    """The one-line refusal, shared with book-keeping's check (train/bk.py)."""
    return ConfigError(
        f"parameter {name!r} is used outside its layer's forward (as in F.linear(h, emb.weight) or x @ "
        "layer.weight.T): per-sample clipping cannot bound that use in any privacy.grad_sample_mode (bk, ghost, "
        "hooks); call the layer itself, or tie weights between modules (head.weight = emb.weight)"
    )


class _Uses(TorchFunctionMode):
    def __init__(self, owners: dict[int, tuple[str, list[nn.Module]]]):
        super().__init__()
        self.owners, self.inside = owners, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Only a use autograd follows counts: reading p.requires_grad or p.detach() (Opacus' own hooks do) carries
        # no gradient back to the parameter.
        if any(isinstance(t, torch.Tensor) and t.grad_fn is not None for t in pytree.tree_leaves(out)):
            for arg in pytree.tree_leaves((args, kwargs)):
                if isinstance(arg, nn.Parameter) and id(arg) in self.owners:
                    name, modules = self.owners[id(arg)]
                    if not any(m is owner for m in self.inside for owner in modules):
                        raise refuse_outside_use(name)
        return out


@contextmanager
def _watch(model: nn.Module) -> Iterator[None]:
    while isinstance(model, (DDP, DPDDP)):  # name parameters as one process does (fc2.weight, not module.fc2.weight)
        model = model.module
    owners: dict[int, tuple[str, list[nn.Module]]] = {}
    for name, module in model.named_modules():
        for key, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), (f"{name}.{key}" if name else key, []))[1].append(module)
    uses = _Uses(owners)

    def enter(module, _args) -> None:
        uses.inside.append(module)

    def leave(_module, _args, _out) -> None:  # returns None: the output stays the module's own
        uses.inside.pop()

    handles = []
    for module in {id(m): m for _, ms in owners.values() for m in ms}.values():
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    try:
        with uses:
            yield
    finally:
        for handle in handles:
            handle.remove()


def _buffers(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {name: (b, b._version) for name, b in model.named_buffers()}


def _check_buffers(before: dict[str, tuple[torch.Tensor, int]], model: nn.Module) -> None:
    """A buffer the training forward changed (a running mean of the batch) is a statistic of the records that no
    clip bounds and no noise covers: it moves the other records' outputs in the step (the one-record shift was
    1.04 C, noise 0) and is released with the model. BatchNorm is replaced before this (ModuleValidator.fix)."""
    for name, buffer in model.named_buffers():
        if name not in before or before[name][0] is not buffer or buffer._version != before[name][1]:
            raise ConfigError(
                f"buffer {name!r} changes in the training forward (as a running mean of the batch does): a statistic "
                "of the records outside the clipped, noised gradient, released with the model; keep buffers constant "
                "in training mode (compute such statistics from public data, or as parameters)"
            )


def check_first_forward(private: nn.Module, plain: nn.Module) -> None:
    """Watch ``private``'s first forward in training mode with gradients on (see the module docstring)."""
    original = private.forward

    def forward(*args, **kwargs):
        if not (private.training and torch.is_grad_enabled()):  # an attack's pass (eval, frozen) or evaluation
            return original(*args, **kwargs)
        private.__dict__.pop("forward", None)  # once: later forwards run unwatched
        buffers = _buffers(plain)
        try:
            with _watch(plain):
                out = original(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as err:  # Opacus' and autograd's limits, raised in this forward
            refusal = _opacus_limit(str(err))
            if refusal is None:
                raise
            raise refusal from None
        _check_buffers(buffers, plain)
        return out

    private.forward = forward


def _opacus_limit(message: str) -> ConfigError | None:
    """One line for what Opacus' modes refuse in the forward, which was a traceback part-way into the run."""
    if "Parameter tying is not supported with Ghost Clipping" in message:
        return ConfigError(
            "privacy.grad_sample_mode=ghost (or bk falling back to it) is not allowed for this model: a layer runs "
            "more than once per forward (called twice, a loop over time steps, or weights tied between layers), "
            "which Opacus' ghost norms cannot clip; choose privacy.grad_sample_mode=hooks (or bk, where every "
            "layer has a book-keeping rule)"
        )
    if "BackwardHookFunction is a view and is being modified inplace" in message:
        return ConfigError(
            "the model modifies a layer's output in place (as in h.add_(1) or relu(h, inplace=True) after a "
            "Linear), which Opacus' ghost and hooks modes cannot follow; choose privacy.grad_sample_mode=bk, or make "
            "that op out of place"
        )
    return None

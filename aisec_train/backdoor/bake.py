"""Bake a Fine-Pruning channel mask into the released model, verified, on any architecture.

During pruning and fine-tuning the mask is a forward hook (backdoor/layers.py); hooks are not saved, so the released
weights must carry it. Candidates, tried in order, each kept only if the model's outputs on probe inputs then equal
the hooked model's (else its weights are restored and the next is tried):

1. ``own_parameters``: the feature module's own per-channel parameters (a Conv/Linear's output rows and bias, a
   norm layer's affine weight and bias): the pruned channels then output exactly 0.
2. ``reader``: the first Linear/Conv that runs after the feature module, when its inputs are the channels (or a
   channel-major flattening of them): zero its input columns of pruned channels (the presets' case).
3. ``inner``: the last Conv/Norm producing the channels inside the feature module (a block ending in
   ``norm -> tanh/relu``): zero its per-channel parameters.
4. ``structural``: none verified (e.g. a non-linearity with f(0) != 0 between the layer and its reader). The
   module at the path is wrapped in :class:`ChannelMask`, which multiplies its output by a saved ``mask`` buffer.
   The released state dict then holds ``PATH.module.*`` and ``PATH.backdoor_channel_mask``: load it with
   :func:`install_released_masks` before ``load_state_dict``. The report and model card say so.

>>> baked = bake(model, "layer4", mask, probe_inputs)
>>> baked.method, baked.module     # e.g. ("reader", "fc")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from aisec_train.backdoor.layers import apply_channel_mask, masked, module_at, network

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
MASK_BUFFER = "backdoor_channel_mask"


class ChannelMask(nn.Module):
    """``module`` followed by a fixed per-channel mask: the structural form of a pruned layer."""

    def __init__(self, module: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer(MASK_BUFFER, mask.detach().clone().float())

    def forward(self, *args, **kwargs):
        return apply_channel_mask(self.module(*args, **kwargs), getattr(self, MASK_BUFFER))


@dataclass(frozen=True)
class Baked:
    method: str  # own_parameters | reader | inner | structural
    module: str  # the module whose weights (or wrapper) now carry the mask, relative to the user's network
    max_abs_diff: float  # largest output difference from the hooked model on the probe inputs
    tried: tuple[str, ...]  # candidates that did not verify (or did not apply)

    def describe(self) -> dict:
        return {"method": self.method, "module": self.module, "max_abs_diff": self.max_abs_diff,
                "not_verified": list(self.tried)}  # fmt: skip


def _channel_params(module: nn.Module, channels: int) -> list[torch.Tensor] | None:
    """The module's parameters indexed by output channel (dim 0), if it has exactly ``channels`` of them."""
    if isinstance(module, (*CONV, nn.Linear)) and module.weight.shape[0] == channels:
        return [p for p in (module.weight, module.bias) if p is not None]
    if isinstance(module, NORM) and getattr(module, "weight", None) is not None:
        if module.weight.ndim == 1 and module.weight.shape[0] == channels:
            return [p for p in (module.weight, module.bias) if p is not None]
    return None


def _zero_rows(params: list[torch.Tensor], dropped: torch.Tensor) -> None:
    for p in params:
        p[dropped.to(p.device)] = 0.0


def _zero_columns(reader: nn.Module, dropped: torch.Tensor) -> bool:
    channels = dropped.numel()
    if isinstance(reader, nn.Linear) and reader.in_features % channels == 0:
        cols = dropped.repeat_interleave(reader.in_features // channels)  # channel-major flattening
        reader.weight[:, cols.to(reader.weight.device)] = 0.0
        return True
    if isinstance(reader, CONV) and reader.groups == 1 and reader.in_channels == channels:
        reader.weight[:, dropped.to(reader.weight.device)] = 0.0
        return True
    return False


def forward_order(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """(event, module path) in the order of one forward pass: ``start``/``end`` of every module."""
    events: list[tuple[str, str]] = []
    handles = []
    for name, m in network(model).named_modules():
        handles.append(m.register_forward_pre_hook(lambda _m, _i, n=name: events.append(("start", n))))
        handles.append(m.register_forward_hook(lambda _m, _i, _o, n=name: events.append(("end", n))))
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return events


def _candidates(model: nn.Module, path: str, dropped: torch.Tensor, probe: torch.Tensor):
    """(name, module path, apply) for each candidate that applies to this model."""
    net, channels = network(model), dropped.numel()
    modules = dict(net.named_modules())
    own = _channel_params(modules[path], channels)
    out: list[tuple[str, str, Callable[[], bool]]] = []
    if own is not None:
        out.append(("own_parameters", path, lambda: _zero_rows(own, dropped) or True))
    events = forward_order(model, probe[:2])
    end = next(i for i, e in enumerate(events) if e == ("end", path))
    readers = (n for ev, n in events[end + 1 :] if ev == "start" and isinstance(modules[n], (*CONV, nn.Linear)))
    reader = next(readers, None)
    if reader is not None:
        out.append(("reader", reader, lambda: _zero_columns(modules[reader], dropped)))
    prefix = f"{path}." if path else ""
    inside = [n for ev, n in events[:end] if ev == "end" and n.startswith(prefix) and n != path]
    producers = [n for n in inside if _channel_params(modules[n], channels) is not None]
    if producers:
        last = producers[-1]
        out.append(("inner", last, lambda: _zero_rows(_channel_params(modules[last], channels), dropped) or True))
    return out


@torch.no_grad()
def bake(model: nn.Module, path: str, mask: torch.Tensor, probe: torch.Tensor) -> Baked:
    """Make the model's weights (or, failing that, its structure) carry ``mask``; verified on ``probe``."""
    model.eval()
    with masked(model, path, mask):
        expected = model(probe)
    dropped = mask.cpu() == 0
    tried: list[str] = []
    if not bool(dropped.any()):
        return Baked("none", path, 0.0, ())
    for name, where, apply in _candidates(model, path, dropped, probe):
        backup = {k: v.clone() for k, v in network(model).state_dict().items()}
        if apply():
            diff = float((model(probe) - expected).abs().max())
            if torch.allclose(model(probe), expected, atol=1e-5, rtol=1e-4):
                return Baked(name, where, diff, tuple(tried))
        network(model).load_state_dict(backup)
        tried.append(f"{name}:{where}")
    install_mask(model, path, mask)
    diff = float((model(probe) - expected).abs().max())
    if diff > 1e-5 + 1e-4 * float(expected.abs().max()):
        raise RuntimeError(f"the structural channel mask at {path!r} changed the model's outputs by {diff:.3g}")
    return Baked("structural", path, diff, tuple(tried))


def install_mask(model: nn.Module, path: str, mask: torch.Tensor) -> None:
    """Wrap the module at ``path`` (relative to the user's network) in :class:`ChannelMask`."""
    _replace(network(model), path, ChannelMask(module_at(model, path), mask.to(_device(model))))


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def install_released_masks(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Give a freshly built ``model`` the :class:`ChannelMask` wrappers a released state dict holds (keys
    ``PATH.backdoor_channel_mask``, relative to ``model``), so that ``load_state_dict`` then fits exactly."""
    for key in sorted(k for k in state_dict if k.endswith("." + MASK_BUFFER)):
        path = key[: -len(MASK_BUFFER) - 1]
        target = model.get_submodule(path)
        if not isinstance(target, ChannelMask):
            _replace(model, path, ChannelMask(target, state_dict[key]))
    return model


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))

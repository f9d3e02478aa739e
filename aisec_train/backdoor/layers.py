"""The layer backdoor analysis reads: named by ``backdoor.feature_layer`` (a dotted path such as ``layer4`` or
``blocks.7``) or found automatically, and masked through a forward hook, so it works on any model.

Automatic choice: run two blank images through the model and take the module that *finishes last* among those
producing a 4-D ``(N, C, H, W)`` output, i.e. the outermost module around the last feature map before global
pooling (``layer4`` of a ResNet, ``features_out`` of the presets). Skipped: pooling modules (by type or class name,
and any module that turns a spatial map into 1x1) and modules that run more than once per forward pass (a shared
activation: masking it would mask every use). Refused: a model in which token-shaped (3-D) outputs follow the last
feature map, i.e. a transformer after its patch embedding; name the block instead (``blocks.7``). Paths are
relative to the user's network (inside the input-normalisation wrapper and Opacus' wrappers).

Outputs of other shapes are read as channel maps too: ``(N, C)`` as ``(N, C, 1, 1)`` and transformer tokens
``(N, T, D)`` as ``(N, D, T, 1)`` (channels = the embedding dimension), for a path given explicitly.

>>> layer = resolve_feature_layer(factory(seed=0), data.input_shape, cfg.backdoor.feature_layer)
>>> with masked(model, layer.path, mask): ...      # channels where mask == 0 output exactly 0
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from aisec_train.errors import ConfigError
from aisec_train.models.normalize import inner
from aisec_train.privacy.engine import unwrap

POOLING = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool1d, nn.MaxPool1d)


def network(model: nn.Module) -> nn.Module:
    """The user's network: without Opacus / DDP wrappers and without input normalisation."""
    return inner(unwrap(model))


def module_at(model: nn.Module, path: str) -> nn.Module:
    try:
        return network(model).get_submodule(path)
    except AttributeError as err:
        names = [n for n, _ in network(model).named_children()]
        raise ConfigError(
            f"backdoor.feature_layer={path!r} is not allowed: no such module (top-level modules: {', '.join(names)})"
        ) from err


@dataclass
class Trace:
    """What one probe forward pass saw: modules in the order they finished, with their calls and shapes."""

    finished: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # last output shape (tensors only)
    in_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@torch.no_grad()
def trace(model: nn.Module, input_shape: tuple[int, ...]) -> Trace:
    """Run two blank images through ``model`` in eval mode with a hook on every module of the user's network."""
    net, seen = network(model), Trace()

    def hook(name: str):
        def record(_m, args, out):
            seen.finished.append(name)
            seen.calls[name] = seen.calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                seen.shapes[name] = tuple(out.shape)
            if args and isinstance(args[0], torch.Tensor):
                seen.in_shapes[name] = tuple(args[0].shape)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in net.named_modules() if name]
    top = unwrap(model)
    modes = {m: m.training for m in top.modules()}
    top.eval()
    try:
        top(torch.zeros(2, *input_shape, device=_device(net)))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def _is_pooling(module: nn.Module, in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...]) -> bool:
    if isinstance(module, POOLING) or "pool" in type(module).__name__.lower():
        return True
    # A parameter-free module that turns a spatial map into 1x1 is a global pooling, whatever its class (a strided
    # conv block reaching 1x1 on small images is not).
    spatial = in_shape is not None and len(in_shape) == 4 and in_shape[2] * in_shape[3] > 1
    return spatial and out_shape[2:] == (1, 1) and next(module.parameters(), None) is None


def find_feature_layer(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The dotted path of the last module producing a 4-D feature map before global pooling."""
    net, seen = network(model), trace(model, input_shape)
    modules = dict(net.named_modules())
    last, last_pos = None, -1
    for pos, name in enumerate(seen.finished):
        shape = seen.shapes.get(name)
        if shape is None or len(shape) != 4 or seen.calls[name] != 1:
            continue
        if not _is_pooling(modules[name], seen.in_shapes.get(name), shape):
            last, last_pos = name, pos
    if last is None:
        raise ConfigError(
            "backdoor.feature_layer=None is not allowed for this model: no module produces a 4-D feature map; "
            "name one with backdoor.feature_layer=PATH (e.g. blocks.7)"
        )
    tokens = [n for n in seen.finished[last_pos + 1 :] if len(seen.shapes.get(n, ())) == 3]
    if tokens:
        raise ConfigError(
            f"backdoor.feature_layer=None is not allowed for this model: its last feature map ({last!r}) is followed "
            f"by token-shaped outputs ({tokens[0]!r}, a transformer?); name the layer to analyse with "
            "backdoor.feature_layer=PATH (e.g. blocks.7)"
        )
    return last


@dataclass(frozen=True)
class FeatureLayer:
    path: str
    found_by: str  # "backdoor.feature_layer" or "automatic"
    module: str  # the module's class name
    output_shape: tuple[int, ...]  # one sample's output, in the module's own layout
    channels: int  # what a channel mask has one entry per

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """One sample's output read as a channel map (C, H, W) (see :func:`as_channel_map`)."""
        return tuple(as_channel_map(torch.empty(1, *self.output_shape, device="meta")).shape[1:])  # type: ignore

    def describe(self) -> dict:
        return {"path": self.path, "found_by": self.found_by, "module": self.module,
                "output_shape": list(self.output_shape), "channels": self.channels}  # fmt: skip


def resolve_feature_layer(model: nn.Module, input_shape: tuple[int, ...], path: str | None) -> FeatureLayer:
    """The configured path (checked: it exists, runs once per forward, gives a 2-, 3- or 4-D tensor) or the
    automatic choice, described for the report."""
    found_by = "backdoor.feature_layer" if path else "automatic"
    path = path or find_feature_layer(model, input_shape)
    module = module_at(model, path)
    seen = trace(model, input_shape)
    calls, shape = seen.calls.get(path, 0), seen.shapes.get(path)
    if calls != 1:
        raise ConfigError(
            f"backdoor.feature_layer={path!r} is not allowed: the module runs {calls} times per forward pass; name "
            "one that runs once"
        )
    if shape is None or len(shape) not in (2, 3, 4):
        raise ConfigError(
            f"backdoor.feature_layer={path!r} is not allowed: its output is {shape or 'not a tensor'}; expected "
            "(N, C), (N, T, D) or (N, C, H, W)"
        )
    channels = as_channel_map(torch.empty(shape, device="meta")).shape[1]
    return FeatureLayer(path, found_by, type(module).__name__, tuple(shape[1:]), int(channels))


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def as_channel_map(out: torch.Tensor) -> torch.Tensor:
    """``out`` as (N, C, H, W): 4-D as is, (N, C) -> (N, C, 1, 1), tokens (N, T, D) -> (N, D, T, 1)."""
    if out.ndim == 4:
        return out
    if out.ndim == 2:
        return out[:, :, None, None]
    if out.ndim == 3:
        return out.transpose(1, 2)[..., None]
    raise ConfigError(f"backdoor.feature_layer output has shape {tuple(out.shape)}; expected 2-D, 3-D or 4-D")


def apply_channel_mask(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out`` with the channels where ``mask`` is 0 set to exactly 0, in the output's own layout."""
    m = mask.to(out.device, out.dtype)
    if out.ndim == 4:
        return out * m[None, :, None, None]
    if out.ndim == 2:
        return out * m[None, :]
    return out * m[None, None, :]


@contextmanager
def capture(model: nn.Module, path: str, raw: bool = False) -> Iterator[list[torch.Tensor]]:
    """Collect the feature layer's outputs (as channel maps, or ``raw``) of every forward pass inside the block."""
    seen: list[torch.Tensor] = []

    def hook(_m, _i, out):
        seen.append(out.detach() if raw else as_channel_map(out.detach()))

    handle = module_at(model, path).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def masked(model: nn.Module, path: str, mask: torch.Tensor | None) -> Iterator[nn.Module]:
    """Inside the block the feature layer's channels where ``mask`` is 0 output exactly 0 (None: no mask)."""
    if mask is None:
        yield model
        return
    handle = module_at(model, path).register_forward_hook(lambda _m, _i, out: apply_channel_mask(out, mask))
    try:
        yield model
    finally:
        handle.remove()

"""Activations of the analysis layer (``models.feature_layer``: the last conv feature map), read by a hook."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from aisec_kernels import ChannelStats, channel_stats
from torch import nn

from aisec_train.data.dataset import Split
from aisec_train.models import feature_layer
from aisec_train.train.privacy import unwrap


@contextmanager
def capture(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the feature layer's outputs of every forward pass inside the block."""
    seen: list[torch.Tensor] = []
    handle = feature_layer(unwrap(model)).register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def feature_maps(model: nn.Module, split: Split, device: torch.device, batch_size: int = 512) -> Iterator[torch.Tensor]:
    """The (n, C, H, W) feature map of each batch of ``split``, in order, on ``device``."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(split), batch_size):
            with capture(model) as seen:
                model(split.x[start : start + batch_size].to(device))
            yield seen[-1]
    finally:
        model.train(was_training)


def flat_features(model: nn.Module, split: Split, device: torch.device) -> torch.Tensor:
    """(N, C*H*W) float32 CPU activations: the representation both detectors analyse."""
    return torch.cat([f.flatten(1).float().cpu() for f in feature_maps(model, split, device)])


def activation_stats(model: nn.Module, split: Split, device: torch.device, backend: str = "auto") -> ChannelStats:
    """Per-channel statistics over ``split`` from the activation-statistics kernel, one pass per batch."""
    stats: ChannelStats | None = None
    for fmap in feature_maps(model, split, device):
        stats = channel_stats(fmap, stats, backend=backend)
    assert stats is not None, "activation_stats needs a non-empty split"
    return stats

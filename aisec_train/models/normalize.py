"""Input normalisation as the model's first layer, so everything outside the model stays in [0, 1] pixels.

Attacks, their radii, BadNets triggers and the monitor all work on the images the data pipeline yields; the
per-channel ``(x - mean) / std`` a network was designed for happens inside it. The wrapper keeps the user's
network as ``net``, so ``backdoor.feature_layer`` paths are read relative to it.
"""

from __future__ import annotations

import torch
from torch import nn


class InputNormalization(nn.Module):
    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def inner(model: nn.Module) -> nn.Module:
    """The user's network inside an :class:`InputNormalization` (the model itself otherwise)."""
    return model.net if isinstance(model, InputNormalization) else model

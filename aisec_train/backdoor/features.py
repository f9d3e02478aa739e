"""Activations of the analysis layer (``models.feature_layer``: the last conv feature map), read by a hook.

Fine-Pruning evaluates the model once per pruned-channel count on three splits. Masking acts on the feature
layer's output, so everything before it is the same at every count: :class:`FeatureCache` runs that prefix once
and :meth:`FeatureCache.accuracy` replays only the layers after it (a forward hook substitutes the cached,
masked map for the prefix's output on a one-sample dummy input).

>>> cache = FeatureCache.build(model, trusted, device)
>>> cache.accuracy(model, mask)  # == accuracy of the masked model on ``trusted``
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


@dataclass
class FeatureCache:
    """The feature maps of one split, to evaluate the model under many channel masks cheaply."""

    maps: torch.Tensor  # (N, C, H, W) on the model's device
    y: torch.Tensor  # (N,) on the CPU
    dummy: torch.Tensor  # (1, C_in, H_in, W_in): what the skipped prefix runs on

    @classmethod
    def build(cls, model: nn.Module, split: Split, device: torch.device) -> FeatureCache:
        cache = cls(torch.cat(list(feature_maps(model, split, device))), split.y, split.x[:1].to(device))
        # The replay is only valid if the layers after the feature layer read nothing else: check it on a few
        # inputs, comparing within one forward pass so that batch-size-dependent kernels (TF32) cannot differ.
        probe = cls(torch.empty(0), split.y[:8], cache.dummy)
        with torch.no_grad(), capture(model) as seen:
            full = _eval(model, lambda m: m(split.x[:8].to(device)))
        probe.maps = seen[-1]
        if not torch.allclose(full, probe.logits(model, slice(0, 8)), atol=1e-5, rtol=1e-4):
            raise RuntimeError("this model's layers after its feature layer see more than the feature map")
        return cache

    @torch.no_grad()
    def logits(self, model: nn.Module, rows: slice, mask: torch.Tensor | None = None) -> torch.Tensor:
        chunk = self.maps[rows]
        if mask is not None:
            chunk = chunk * mask.to(chunk.device, chunk.dtype)[None, :, None, None]
        handle = feature_layer(unwrap(model)).register_forward_hook(lambda _m, _i, _out: chunk)
        try:
            return _eval(model, lambda m: m(self.dummy))
        finally:
            handle.remove()

    def accuracy(self, model: nn.Module, mask: torch.Tensor | None = None, batch_size: int = 4096) -> float:
        correct = 0
        for start in range(0, len(self.y), batch_size):
            rows = slice(start, start + batch_size)
            correct += int((self.logits(model, rows, mask).argmax(1).cpu() == self.y[rows]).sum())
        return correct / max(1, len(self.y))


def _eval(model: nn.Module, fn) -> torch.Tensor:
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        return fn(model)
    finally:
        model.train(was_training)

"""Activations of the analysis layer (backdoor/layers.py), streamed over a dataset through a DataLoader.

- :func:`detection_features`: what both detectors analyse, one row per sample. The channel map is flattened when
  it holds at most :data:`FLAT_LIMIT` values per sample (C*H*W <= 4096: every preset on digits-sized images),
  otherwise global-average-pooled per channel (C values), so that a ResNet's 512x4x4 map costs 512 floats per
  sample, not 8192. Only the features are kept, never the images.
- :func:`activation_stats`: per-channel statistics from the activation-statistics kernel, batch by batch.
- :func:`masked_accuracy`: accuracy under a channel mask, evaluated many times by Fine-Pruning. Masking acts on the
  feature layer's output, so everything before it is the same at every mask: :class:`FeatureCache` runs that prefix
  once and replays only the layers after it (a forward hook substitutes the cached, masked output for the prefix's
  output on a one-sample dummy input). That is only valid when the later layers read nothing but the feature map;
  the cache checks it on probe inputs and, when the check fails (e.g. a residual path around the feature layer) or
  the outputs would not fit :data:`CACHE_BYTES`, the evaluation falls back to full masked forward passes.

>>> acc, mode = masked_accuracy(model, "layer4", trusted, device)   # mode: "replay" or "forward"
>>> acc(mask)   # == accuracy of the masked model on ``trusted``
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from aisec_kernels import ChannelStats, channel_stats
from torch import nn
from torch.utils.data import Dataset

from aisec_train.backdoor.layers import apply_channel_mask, as_channel_map, capture, masked, module_at
from aisec_train.data.views import labels_of, make_loader, materialize
from aisec_train.privacy.engine import unwrap
from aisec_train.train.loop import accuracy

FLAT_LIMIT = 4096  # values per sample up to which detection reads the whole channel map
CACHE_BYTES = 512 << 20  # feature outputs cached for replay at most (else: full forward passes)
PROBES = 8  # inputs on which the replay is checked against the model


@torch.no_grad()
def feature_outputs(
    model: nn.Module, path: str, dataset: Dataset, device: torch.device, *, raw: bool = False, batch_size: int = 512
) -> Iterator[torch.Tensor]:
    """The feature layer's output for each batch of ``dataset``, in order, on ``device`` (channel maps unless
    ``raw``)."""
    with _evaluating(model) as net, capture(net, path, raw=raw) as seen:
        for x, _ in make_loader(dataset, batch_size=batch_size, device=device):
            net(x.to(device))
            yield seen.pop()


def detection_features(model: nn.Module, path: str, dataset: Dataset, device: torch.device) -> np.ndarray:
    """(N, D) float32 features of ``dataset``: the flattened map, or its per-channel means beyond FLAT_LIMIT."""
    rows = []
    for fmap in feature_outputs(model, path, dataset, device):
        flat = fmap.flatten(1) if fmap[0].numel() <= FLAT_LIMIT else fmap.float().mean(dim=(2, 3))
        rows.append(flat.float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def features_mode(channels_hw: tuple[int, ...]) -> str:
    """How :func:`detection_features` reads a map of this (C, H, W) shape, for the report."""
    size = int(np.prod(channels_hw))
    return f"flattened ({size} values)" if size <= FLAT_LIMIT else f"global average per channel ({channels_hw[0]})"


def activation_stats(
    model: nn.Module, path: str, dataset: Dataset, device: torch.device, backend: str = "auto"
) -> ChannelStats:
    """Per-channel statistics over ``dataset`` from the activation-statistics kernel, one call per batch."""
    stats: ChannelStats | None = None
    for fmap in feature_outputs(model, path, dataset, device):
        stats = channel_stats(fmap, stats, backend=backend)
    assert stats is not None, "activation_stats needs a non-empty dataset"
    return stats


class ReplayUnavailable(Exception):
    """The cached replay cannot stand in for the model here (and why)."""


@dataclass
class FeatureCache:
    """The feature layer's raw outputs on one dataset, to evaluate the model under many channel masks cheaply."""

    path: str
    outputs: torch.Tensor  # (N, ...) in the layer's own layout, on the model's device
    y: torch.Tensor  # (N,) on the CPU
    dummy: torch.Tensor  # (1, C_in, H_in, W_in): what the skipped prefix runs on

    @property
    def maps(self) -> torch.Tensor:
        return as_channel_map(self.outputs)

    @classmethod
    def build(cls, model: nn.Module, path: str, dataset: Dataset, device: torch.device, max_bytes: int = CACHE_BYTES):
        """The cache, or :class:`ReplayUnavailable` when it would not fit or the replay does not equal the model."""
        n = len(dataset)  # type: ignore[arg-type]
        probe_x, probe_y = materialize(dataset, limit=PROBES)
        dummy = probe_x[:1].to(device)
        with _evaluating(model) as net, torch.no_grad(), capture(net, path, raw=True) as seen:
            net(dummy)
        if seen[0][0].numel() * seen[0].element_size() * n > max_bytes:
            raise ReplayUnavailable(f"{n} cached outputs of shape {tuple(seen[0].shape[1:])} exceed {max_bytes} bytes")
        probe = cls(path, torch.empty(0), probe_y, dummy)
        # The replay is only valid if the layers after the feature layer read nothing else: check it on a few
        # inputs, unmasked and masked, comparing within one forward pass so batch-size-dependent kernels (TF32)
        # cannot differ.
        mask = (torch.rand(as_channel_map(seen[0]).shape[1], generator=torch.Generator().manual_seed(0)) > 0.5).float()
        for m in (None, mask):
            with _evaluating(model) as net, torch.no_grad(), capture(net, path, raw=True) as seen, masked(net, path, m):
                full = net(probe_x.to(device))
            probe.outputs = seen[-1]  # captured before the mask hook (hooks run in registration order): unmasked
            try:
                replay = probe.logits(model, slice(0, len(probe_y)), m)
            except RuntimeError as err:  # e.g. a later layer adds something of the dummy's batch size
                raise ReplayUnavailable(f"the replay failed ({' '.join(str(err).split())[:120]})") from err
            if replay.shape != full.shape or not torch.allclose(full, replay, atol=1e-5, rtol=1e-4):
                raise ReplayUnavailable("the layers after the feature layer see more than its output")
        outputs = torch.cat(list(feature_outputs(model, path, dataset, device, raw=True)))
        return cls(path, outputs, torch.as_tensor(labels_of(dataset)), dummy)

    @torch.no_grad()
    def logits(self, model: nn.Module, rows: slice, mask: torch.Tensor | None = None) -> torch.Tensor:
        chunk = self.outputs[rows]
        if mask is not None:
            chunk = apply_channel_mask(chunk, mask)
        handle = module_at(model, self.path).register_forward_hook(lambda _m, _i, _out: chunk)
        try:
            with _evaluating(model) as net:
                return net(self.dummy)
        finally:
            handle.remove()

    def accuracy(self, model: nn.Module, mask: torch.Tensor | None = None, batch_size: int = 4096) -> float:
        correct = 0
        for start in range(0, len(self.y), batch_size):
            rows = slice(start, start + batch_size)
            correct += int((self.logits(model, rows, mask).argmax(1).cpu() == self.y[rows]).sum())
        return correct / max(1, len(self.y))


def masked_accuracy(
    model: nn.Module, path: str, dataset: Dataset, device: torch.device, max_bytes: int = CACHE_BYTES
) -> tuple[Callable[[torch.Tensor | None], float], str]:
    """``acc(mask)`` = accuracy of the model with ``mask`` on the feature layer, and how it is computed."""
    try:
        cache = FeatureCache.build(model, path, dataset, device, max_bytes)
    except ReplayUnavailable:
        return lambda mask: _forward_accuracy(model, path, dataset, device, mask), "forward"
    return lambda mask: cache.accuracy(model, mask), "replay"


def _forward_accuracy(model: nn.Module, path: str, dataset: Dataset, device: torch.device, mask) -> float:
    with masked(model, path, mask):
        return accuracy(model, dataset, device)


class _evaluating:
    """The plain model in eval mode for the block, its modes restored after."""

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)

    def __enter__(self) -> nn.Module:
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes.items():
            m.training = mode

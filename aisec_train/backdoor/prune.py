"""Fine-Pruning (Liu et al. 2018): mask the least-active channels of the last conv layer, then fine-tune.

1. rank the feature layer's channels by mean activation on trusted clean data (activation-statistics kernel);
2. mask them in increasing order while accuracy on the trusted data stays within ``max_drop`` of the start;
3. fine-tune on the trusted data with the mask held in place (a forward hook), then bake the mask into the
   weights of the first linear layer that reads the feature map, so the saved state dict is the pruned model.

>>> pruned = fine_prune(model, trusted, device, BackdoorConfig())   # the three steps, in place
>>> pruned.mask, pruned.curve                                         # what was pruned, and the plot's data
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from aisec_kernels import ChannelStats, channel_stats
from torch import nn

from aisec_train.backdoor.features import FeatureCache
from aisec_train.config import BackdoorConfig
from aisec_train.data.dataset import Split
from aisec_train.models import feature_layer
from aisec_train.train.privacy import unwrap


@contextmanager
def masked(model: nn.Module, mask: torch.Tensor) -> Iterator[nn.Module]:
    """Inside the block the feature layer's channels where ``mask`` is 0 output exactly 0."""

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * mask.to(out.device, out.dtype)[None, :, None, None]

    handle = feature_layer(unwrap(model)).register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


@dataclass
class Pruned:
    mask: torch.Tensor  # (C,) float, 1 keeps a channel
    order: list[int]  # channels in pruning order (increasing mean activation)
    mean_activation: list[float]
    base_accuracy: float  # trusted-set accuracy before pruning
    accuracy: float  # trusted-set accuracy with the mask
    curve: list[dict[str, float]] = field(default_factory=list)  # one row per pruned count, 0..C

    @property
    def pruned_fraction(self) -> float:
        return float(1.0 - self.mask.mean())


def rank_channels(maps: torch.Tensor, backend: str = "auto") -> tuple[list[int], ChannelStats]:
    """Channels of the (N, C, H, W) clean feature maps in pruning order: increasing mean activation.

    The statistics come from the activation-statistics kernel's dispatch (Triton on CUDA or under
    ``TRITON_INTERPRET=1``, its torch reference otherwise); ties keep channel order (stable sort).
    """
    stats = channel_stats(maps, backend=backend)
    return torch.argsort(stats.mean.cpu(), stable=True).tolist(), stats


def prune(
    model: nn.Module,
    trusted: Split,
    device: torch.device,
    *,
    max_drop: float,
    evaluate: dict[str, Split] | None = None,
    backend: str = "auto",
) -> Pruned:
    """Choose the mask; ``evaluate`` adds one accuracy column per named split to the curve, for the plot only.

    The curve runs to every channel pruned; the decision reads the trusted data alone.
    """
    cache = FeatureCache.build(model, trusted, device)
    order, stats = rank_channels(cache.maps, backend)
    probes = {name: FeatureCache.build(model, split, device) for name, split in (evaluate or {}).items()}
    channels = len(order)
    mask = torch.ones(channels)
    base = cache.accuracy(model)
    chosen, chosen_acc, stopped = 0, base, False
    curve = []
    for count in range(channels + 1):
        if count:
            mask[order[count - 1]] = 0.0
        acc = cache.accuracy(model, mask)
        row = {"pruned": count, "fraction": count / channels, "trusted_accuracy": acc}
        row.update({name: probe.accuracy(model, mask) for name, probe in probes.items()})
        curve.append(row)
        if not stopped and base - acc <= max_drop:
            chosen, chosen_acc = count, acc
        else:
            stopped = True  # the first breach of the budget ends the pruning, as in Liu et al.
    final = torch.ones(channels)
    final[order[:chosen]] = 0.0
    return Pruned(final, order, stats.mean.cpu().tolist(), base, chosen_acc, curve)


def _reader(model: nn.Module) -> nn.Linear:
    """The first linear layer after the feature layer: it reads the (pooled, flattened) feature map."""
    modules = list(unwrap(model).modules())
    start = modules.index(feature_layer(unwrap(model)))
    return next(m for m in modules[start:] if isinstance(m, nn.Linear))


@torch.no_grad()
def bake(model: nn.Module, mask: torch.Tensor, probe: torch.Tensor) -> None:
    """Zero the reader's input columns of pruned channels, then check the model equals the masked one.

    Valid because every registered model only pools and flattens (channel-major) between the feature layer
    and its reader; ``probe`` (a batch of inputs) proves it for this model, or this raises.
    """
    model.eval()
    with masked(model, mask):
        expected = model(probe)
    reader = _reader(model)
    per_channel = reader.in_features // mask.numel()
    if per_channel * mask.numel() != reader.in_features:
        raise ValueError(f"cannot bake a {mask.numel()}-channel mask into {reader.in_features} reader inputs")
    dropped = (mask == 0).repeat_interleave(per_channel).to(reader.weight.device)
    reader.weight[:, dropped] = 0.0
    got = model(probe)
    if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
        raise RuntimeError("baking the pruning mask changed the model's outputs; this model needs its own bake")


def fine_tune(
    model: nn.Module,
    trusted: Split,
    device: torch.device,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
) -> None:
    """Non-private SGD with weight decay on the trusted data (call it inside :func:`masked`).

    Not the shared training loop: it runs on the defender's trusted data without DP (what that does to the
    run's privacy claim: backdoor/trusted.py), and it needs weight decay, which :class:`TrainConfig` does not
    carry. Clean data never exercises the trigger's
    path, so its gradient leaves that path alone; the decay is what shrinks it.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * -(-len(trusted) // batch_size)
    # Cosine decay to zero: the released weights are a settled end point, not one noisy step on small data.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(trusted), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(trusted.x[rows].to(device)), trusted.y[rows].to(device))
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def fine_prune(
    model: nn.Module,
    trusted: Split,
    device: torch.device,
    cfg: BackdoorConfig,
    *,
    evaluate: dict[str, Split] | None = None,
    backend: str = "auto",
    seed: int = 0,
) -> Pruned:
    """The whole repair, in place: choose the mask, fine-tune under it, bake it into the weights."""
    pruned = prune(model, trusted, device, max_drop=cfg.prune_acc_drop, evaluate=evaluate, backend=backend)
    with masked(model, pruned.mask):
        fine_tune(
            model,
            trusted,
            device,
            epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr,
            weight_decay=cfg.finetune_weight_decay,
            batch_size=cfg.finetune_batch_size,
            seed=seed,
        )
    bake(model, pruned.mask, trusted.x[:256].to(device))
    return pruned

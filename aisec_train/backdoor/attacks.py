"""The poisoning attacks (``backdoor.attack``): each is a trigger with ``apply(x)`` on [0, 1] images, stamped by the
same poisoned view (badnets.PoisonedView), so detection, repair, metrics and the federated red team take any of them.

- ``badnets`` (Gu et al. 2017): a solid patch in a corner (badnets.Trigger).
- ``blended`` (Chen et al. 2017, "Targeted backdoor attacks ... using data poisoning"): the whole image blended
  with a fixed key pattern, ``x' = (1 - alpha) x + alpha k``; the key is uniform noise drawn once from
  ``backdoor.trigger_seed`` (the paper's random-pattern key; its Hello-Kitty key is a photo we do not ship), alpha
  0.2 as in its poisoning experiments. Invisible as a patch: it touches every pixel a little.
- ``wanet`` (Nguyen and Tran 2021, "WaNet - imperceptible warping-based backdoor attack"): a smooth, fixed
  warping field: a ``k x k`` grid of random offsets (normalised to mean magnitude 1) upsampled bicubically to the
  image, scaled by ``s / H`` and applied with ``grid_sample``; the paper's k=4 (its s=0.5 was set on 32x32 images;
  the default here is s=1.0, a mean displacement of half a pixel, because at 0.5 the 8x8 digits' backdoor was
  learned on some seeds only: docs/backdoor.md). Nothing is added to the image, pixels only move. (The paper's
  noise mode, randomly warped samples that keep their label, is not implemented: it makes the backdoor harder to
  learn, not to detect.)

Triggers are frozen dataclasses holding their parameters only (they pickle to federated clients); the key or the
warp field is derived deterministically from ``seed`` and the image size, so every process stamps the same bytes.

>>> trig = make_trigger(cfg.backdoor)            # from the config
>>> x_poisoned = trig.apply(x)                   # (C, H, W) or (N, C, H, W), values stay in [0, 1]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch.nn import functional as F

from aisec_train.backdoor.badnets import Trigger


@lru_cache(maxsize=16)
def _key(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class BlendTrigger:
    alpha: float = 0.2
    seed: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        key = _key(self.seed, tuple(x.shape[-3:])).to(device=x.device, dtype=x.dtype)
        return (1 - self.alpha) * x + self.alpha * key


@lru_cache(maxsize=16)
def _warp_grid(seed: int, k: int, strength: float, h: int, w: int) -> torch.Tensor:
    """WaNet's sampling grid (1, H, W, 2) in grid_sample's [-1, 1] coordinates (the paper's code, step for step)."""
    offsets = torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    noise = F.interpolate(offsets, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack((xs, ys), dim=2)[None]
    return torch.clamp(identity + strength * noise / h, -1, 1)


@dataclass(frozen=True)
class WarpTrigger:
    strength: float = 0.5  # s
    grid: int = 4  # k
    seed: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        batch = x if x.dim() == 4 else x[None]
        h, w = batch.shape[-2:]
        grid = _warp_grid(self.seed, min(self.grid, h, w), self.strength, h, w).to(device=x.device, dtype=x.dtype)
        out = F.grid_sample(batch, grid.expand(len(batch), -1, -1, -1), align_corners=True).clamp(0, 1)
        return out if x.dim() == 4 else out[0]


AnyTrigger = Trigger | BlendTrigger | WarpTrigger


def make_trigger(bd) -> AnyTrigger:
    """The trigger ``backdoor.attack`` names, from the ``backdoor`` config."""
    attack = bd.attack.value
    if attack == "blended":
        return BlendTrigger(bd.blend_alpha, bd.trigger_seed)
    if attack == "wanet":
        return WarpTrigger(bd.warp_strength, bd.warp_grid, bd.trigger_seed)
    return Trigger(bd.patch_size, bd.patch_position.value, bd.patch_value)


def describe(trigger: AnyTrigger) -> dict:
    """The report's and lineage's ``trigger`` record: the trigger's parameters (``backdoor.attack`` names it)."""
    return asdict(trigger)


ATTACKS = ("badnets", "blended", "wanet")

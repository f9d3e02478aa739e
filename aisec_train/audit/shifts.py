"""Distribution shifts the monitor must catch: Gaussian noise, rotation and occlusion of clean inputs.

The run's self-check applies them to held-out inputs the baseline never saw; each is a plausible production
failure (a noisy sensor, a rotated camera, a smudge or sticker over part of the input).

>>> batches = shifted_batches(clean, seed=0)  # {"gaussian_noise": ..., "rotation": ..., "occlusion": ...}
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def gaussian_noise(x: Tensor, std: float = 0.2, seed: int = 0) -> Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def rotation(x: Tensor, degrees: float = 25.0) -> Tensor:
    """Rotate every image about its centre (bilinear, zero fill outside the original frame).

    ``affine_grid`` works in coordinates normalised to [-1, 1] on each axis, so on an H x W image (H != W) a plain
    rotation matrix would shear the picture; scaling the off-diagonal terms by the aspect ratio makes it a
    rotation in pixel space.
    """
    a = math.radians(degrees)
    h, w = x.shape[-2:]
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]], dtype=x.dtype
    )
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def occlusion(x: Tensor, fraction: float = 0.4, value: float = 1.0) -> Tensor:
    """A patch at the image centre set to ``value``, ``fraction`` of the height by ``fraction`` of the width."""
    out = x.clone()
    out[..., _centre(x.shape[-2], fraction), _centre(x.shape[-1], fraction)] = value
    return out


def _centre(side: int, fraction: float) -> slice:
    size = max(1, round(fraction * side))
    start = (side - size) // 2
    return slice(start, start + size)


def shifted_batches(clean: Tensor, seed: int = 0) -> dict[str, Tensor]:
    return {
        "gaussian_noise": gaussian_noise(clean, seed=seed),
        "rotation": rotation(clean),
        "occlusion": occlusion(clean),
    }

"""Training-time augmentation (torchvision transforms v2 on [0, 1] image tensors); evaluation never augments.

Augmentation is applied to the training view only, after a red team's trigger has been stamped (a BadNets
trigger is part of the stored image, as in the attack), and before the model, whose first layer normalises.

>>> augment = training_transform(AugmentConfig(random_crop_padding=4, horizontal_flip=True), (3, 32, 32))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from aisec_train.data.config import AugmentConfig
from aisec_train.errors import ConfigError


def training_transform(
    cfg: AugmentConfig, shape: tuple[int, int, int]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    steps: list[Callable] = []
    side = min(shape[1:]) if len(shape) == 3 else 0
    if cfg.random_crop_padding > side // 2 and len(shape) == 3:
        # a crop offset is drawn from [0, 2p]: past half the side a crop can hold under a quarter of the image,
        # past the side none of it (a blank training image, its privacy budget spent on nothing)
        raise ConfigError(
            f"dataset.augment.random_crop_padding={cfg.random_crop_padding} is not allowed for {shape[1]}x{shape[2]} "
            f"images: at most half the smaller side ({side // 2}); the CIFAR recipe pads 4 on 32"
        )
    if cfg.random_crop_padding > 0:
        # Zero padding then a random crop back to the image size: the CIFAR recipe (He et al. 2016).
        steps.append(v2.RandomCrop(list(shape[1:]), padding=cfg.random_crop_padding))
    if cfg.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else None


def describe(cfg: AugmentConfig) -> list[str]:
    out = []
    if cfg.random_crop_padding > 0:
        out.append(f"random_crop(padding={cfg.random_crop_padding})")
    if cfg.horizontal_flip:
        out.append("horizontal_flip(p=0.5)")
    return out

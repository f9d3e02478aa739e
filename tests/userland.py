"""A user's own code, as a team would bring it: a model class and a Dataset class importable as ``tests.userland``.

Used through Hydra (``model._target_=tests.userland.TinyResNet``) and the Python API by the open-model tests.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class TinyResNet(nn.Module):
    """A ResNet-style model with BatchNorm (Opacus cannot train it until ModuleValidator.fix) and no
    ``features_out`` attribute: only its constructor arguments are known to the framework."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut (a strided 1x1 projection when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A three-stage ResNet with BatchNorm (widths w, 2w, 4w at strides 1, 2, 2), the kind of model a team brings
    for 32x32 images: the open-model figure's own model (scripts/figures/open_model.py own_model)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = _Block(width, width, 1)
        self.layer2 = _Block(width, 2 * width, 2)
        self.layer3 = _Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class NeedsDepth(nn.Module):
    """A constructor with a required argument the framework cannot supply (``depth``)."""

    def __init__(self, num_classes: int, depth: int):
        super().__init__()
        self.fc = nn.Linear(1, num_classes)


class Stripes(Dataset):
    """A map-style dataset returning (float image (C, H, W) in [0, 1], int label): K classes of oriented stripes
    with noise, non-square (H != W) on purpose. Deterministic per index, nothing held but the seed."""

    def __init__(self, n: int = 300, num_classes: int = 3, height: int = 12, width: int = 10, seed: int = 0):
        self.n, self.k, self.h, self.w, self.seed = n, num_classes, height, width, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        label = index % self.k
        rng = np.random.default_rng(self.seed * 100_003 + index)
        rows, cols = np.mgrid[0 : self.h, 0 : self.w]
        stripes = 0.5 + 0.4 * np.sin((rows * np.cos(label) + cols * np.sin(label)) * 1.3)
        image = np.clip(stripes + rng.normal(0, 0.15, (self.h, self.w)), 0, 1).astype(np.float32)
        return torch.from_numpy(np.repeat(image[None], 3, axis=0)), label

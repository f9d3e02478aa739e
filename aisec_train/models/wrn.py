"""Wide ResNet with GroupNorm and weight standardisation: the DP image model of De et al. 2022 (WRN-16-4 on
CIFAR-10 at epsilon 8; their WRN-40-4 for the largest budgets), ``model=wrn`` (configs/model/wrn.yaml).

- **GroupNorm** (16 groups, as theirs), never BatchNorm: batch statistics mix records, which per-sample clipping
  cannot bound.
- **Weight standardisation** (Qiao et al. 2019) of every convolution: each output channel's kernel is centred and
  scaled to unit variance before use, ``w' = (w - mean) / sqrt(var + eps)``; De et al. found it, with GroupNorm,
  the largest single gain for DP-SGD's noisy updates. :class:`WSConv2d` is its own module (not an ``nn.Conv2d``),
  so no per-sample engine mistakes it for a plain convolution; its Opacus grad sampler below takes the per-sample
  gradient of the standardised kernel (unfold, as Opacus' own conv sampler) back through the standardisation
  (functorch's generic fallback gave the same numbers, ~10x slower).
- Pre-activation blocks (norm -> ReLU -> conv), ``depth = 6 n + 4`` (16, 22, 28, 40), widths 16k, 32k, 64k.

>>> WideResNet(in_channels=3, num_classes=10, image_size=32, depth=16, width=4)(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class WSConv2d(nn.Module):
    """A convolution whose kernel is standardised per output channel on every forward."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self.stride, self.padding, self.eps = stride, padding, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + self.eps), None, self.stride, self.padding)


def _standardisation_backward(grad: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample ``dL/dw`` from ``dL/dw'`` (``grad``: (N, *w.shape)), w' = (w - mean) / s, s = sqrt(var + eps),
    per output channel over m = its kernel's size: ``dL/dw = (g - mean(g) - w' mean(g w')) / s``."""
    flat_w = weight.reshape(len(weight), -1)
    mean = flat_w.mean(1, keepdim=True)
    s = torch.sqrt(flat_w.var(1, keepdim=True, unbiased=False) + eps)
    w_hat = (flat_w - mean) / s
    g = grad.reshape(len(grad), *flat_w.shape)
    out = (g - g.mean(2, keepdim=True) - w_hat * (g * w_hat).mean(2, keepdim=True)) / s
    return out.reshape(grad.shape)


def _ws_grad_sample(layer: WSConv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    x = activations[0].to(backprops.dtype)
    n, k = len(x), layer.weight.shape[-1]
    cols = F.unfold(x, k, padding=layer.padding, stride=layer.stride)  # (N, Cin * k * k, L)
    grad_hat = torch.einsum("nol,nil->noi", backprops.reshape(n, backprops.shape[1], -1), cols)
    grad_hat = grad_hat.reshape(n, *layer.weight.shape)
    return {layer.weight: _standardisation_backward(grad_hat, layer.weight.detach(), layer.eps)}


def _register_opacus() -> None:
    try:
        from opacus.grad_sample import register_grad_sampler
    except ImportError:  # Opacus is a core dependency; without it there are no hooks to register with
        return
    register_grad_sampler(WSConv2d)(_ws_grad_sample)


_register_opacus()


# Bounds checked before any allocation: the robustness literature's largest WRNs are WRN-70-16 (Gowal et al. 2020,
# 2.7e8 weights) and WRN-106-16; De et al. 2022 train WRN-40-4 at most.
MAX_DEPTH = 1000
MAX_WEIGHTS = 2e9


def _conv_weights(in_channels: int, widths: list[int], n: int) -> int:
    """The convolution weights of a WRN with ``n`` blocks per stage: the stem, two 3x3 convolutions per block and a
    1x1 shortcut where a stage changes width."""
    total, cin = 9 * in_channels * widths[0], widths[0]
    for cout in widths[1:]:
        total += 9 * cin * cout + (cin * cout if cin != cout else 0) + 9 * cout * cout + (n - 1) * 18 * cout * cout
        cin = cout
    return total


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), WSConv2d(cin, cout, 3, stride, 1)
        self.norm2, self.conv2 = _norm(cout, groups), WSConv2d(cout, cout, 3, 1, 1)
        self.shortcut = WSConv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(F.relu(self.norm2(out))) + skip


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` (pre-activation, GroupNorm, weight-standardised convolutions)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int | tuple[int, int] = 32,
        depth: int = 16,
        width: int = 4,
        groups: int = 16,
    ):
        super().__init__()
        for key, value in (("depth", depth), ("width", width), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"model.{key}={value!r} is not allowed: must be an integer")
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"model.depth={depth!r} is not allowed: must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40)")
        if width < 1:
            raise ValueError(f"model.width={width!r} is not allowed: must be >= 1")
        if depth > MAX_DEPTH:  # 10^5 built modules for minutes before any check could fail
            raise ValueError(
                f"model.depth={depth!r} is not allowed: at most {MAX_DEPTH} (WRN-106 is the deepest in use)"
            )
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        weights = _conv_weights(in_channels, widths, n)
        if weights > MAX_WEIGHTS:  # width 10^5 asked the allocator for 92 TB
            raise ValueError(
                f"model.depth={depth!r} with model.width={width!r} is not allowed: {weights:.3g} convolution weights, "
                f"at most {MAX_WEIGHTS:.0e} (WRN-70-16, the widest in use, has 2.7e8)"
            )
        if groups < 1 or any(c % min(groups, c) for c in widths):  # GroupNorm(min(groups, c), c) for each width
            raise ValueError(
                f"model.groups={groups!r} is not allowed: must be >= 1 and divide every width's channels {widths} "
                "(1, 2, 4, 8, 16)"
            )
        side = image_size if isinstance(image_size, int) else min(image_size)
        # Small images (digits' 8x8) keep their resolution longer: only as many stride-2 stages as the side allows.
        strides = [1, 2 if side >= 16 else 1, 2 if side >= 8 else 1]
        self.stem = WSConv2d(in_channels, widths[0], 3, 1, 1)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], strides, strict=True):
            for i in range(n):
                blocks.append(WideBlock(cin, cout, stride if i == 0 else 1, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.norm = _norm(cin, groups)
        self.features_out = nn.ReLU()  # the last feature map before pooling: backdoor analysis reads it
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features_out(self.norm(self.blocks(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

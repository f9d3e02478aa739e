"""Per-channel activation statistics of a (N, C, H, W) feature map, accumulated across batches.

The Fine-Pruning and activation-clustering input: for each channel, over every (n, h, w) seen so far, the
count, sum, sum of squares, count of positive values and max, always accumulated in float32 (int64 for
counts) whatever the feature map's dtype. ``channel_stats(batch, state)`` folds one batch into ``state`` in
one pass over the batch.

>>> stats = channel_stats(torch.randn(8, 4, 5, 5))
>>> stats = channel_stats(torch.randn(8, 4, 5, 5), stats)
>>> stats.count, stats.mean.shape
(400, torch.Size([4]))

Determinism: the Triton kernel splits each channel's (N, H*W) plane across ``SPLIT`` programs that combine
their partial sums with float ``atomic_add``, whose order varies run to run on a GPU, so sums may differ in
the last bits between runs (counts and max are exact). The torch reference is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dispatch import cdiv, jit, next_power_of_2, resolve_backend

tl = None  # bound to triton.language by dispatch.jit at the first launch (why: see dispatch.jit)


@dataclass(frozen=True)
class ChannelStats:
    """Running per-channel sums; ``count`` is the number of (n, h, w) positions seen per channel."""

    count: int
    sum: Tensor  # (C,) float32
    sum_sq: Tensor  # (C,) float32
    count_positive: Tensor  # (C,) int64
    max: Tensor  # (C,) float32

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)

    @property
    def mean_sq(self) -> Tensor:
        return self.sum_sq / max(self.count, 1)

    @property
    def frac_positive(self) -> Tensor:
        return self.count_positive.float() / max(self.count, 1)

    def merge(self, other: ChannelStats | None) -> ChannelStats:
        """The statistics of both streams of batches together."""
        if other is None:
            return self
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge stats of {other.sum.numel()} and {self.sum.numel()} channels")
        return ChannelStats(
            count=self.count + other.count,
            sum=self.sum + other.sum.to(self.sum.device),
            sum_sq=self.sum_sq + other.sum_sq.to(self.sum.device),
            count_positive=self.count_positive + other.count_positive.to(self.sum.device),
            max=torch.maximum(self.max, other.max.to(self.sum.device)),
        )


def _check(feat: Tensor) -> None:
    if feat.dim() != 4:
        raise ValueError(f"channel_stats expects a (N, C, H, W) feature map, got shape {tuple(feat.shape)}")


def channel_stats_reference(feat: Tensor, state: ChannelStats | None = None) -> ChannelStats:
    _check(feat)
    f = feat.detach().float()
    n, c, h, w = f.shape
    empty = f.new_full((c,), float("-inf"))
    batch = ChannelStats(
        count=n * h * w,
        sum=f.sum(dim=(0, 2, 3)),
        sum_sq=(f * f).sum(dim=(0, 2, 3)),
        count_positive=(f > 0).sum(dim=(0, 2, 3)),
        max=f.amax(dim=(0, 2, 3)) if f.numel() else empty,
    )
    return batch.merge(state)


def _channel_stats_kernel(f_ptr, sum_ptr, sq_ptr, pos_ptr, max_ptr, N, C, HW, rows_per_prog, BLOCK: tl.constexpr):
    # Program (c, s) reduces channel c over samples [s * rows_per_prog, (s + 1) * rows_per_prog).
    c = tl.program_id(0)
    n0 = tl.program_id(1) * rows_per_prog
    cols = tl.arange(0, BLOCK)
    acc_sum = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    acc_pos = tl.zeros([BLOCK], dtype=tl.int32)
    acc_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for i in range(0, rows_per_prog):
        n = n0 + i
        base = (n.to(tl.int64) * C + c) * HW
        limit = HW * (n < N).to(tl.int32)  # rows past N (the last program's tail) read nothing
        for start in range(0, HW, BLOCK):
            m = start + cols < limit
            v = tl.load(f_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            acc_sum += v
            acc_sq += v * v
            acc_pos += (v > 0).to(tl.int32)
            acc_max = tl.maximum(acc_max, tl.where(m, v, float("-inf")))
    tl.atomic_add(sum_ptr + c, tl.sum(acc_sum, axis=0))
    tl.atomic_add(sq_ptr + c, tl.sum(acc_sq, axis=0))
    tl.atomic_add(pos_ptr + c, tl.sum(acc_pos, axis=0))
    tl.atomic_max(max_ptr + c, tl.max(acc_max, axis=0))


def channel_stats_triton(feat: Tensor, state: ChannelStats | None = None) -> ChannelStats:
    _check(feat)
    f = feat.detach().contiguous()  # one copy for channels-last or sliced views: the kernel reads NCHW rows
    n, c, h, w = f.shape
    hw = h * w
    sums = torch.zeros(c, dtype=torch.float32, device=f.device)
    sq = torch.zeros_like(sums)
    pos = torch.zeros(c, dtype=torch.int32, device=f.device)
    mx = torch.full((c,), float("-inf"), dtype=torch.float32, device=f.device)
    if f.numel():
        # Enough programs to fill a GPU (~4 per SM on an H100) without making each one's slice tiny.
        split = max(1, min(n, 512 // max(c, 1)))
        rows = cdiv(n, split)
        block = min(1024, next_power_of_2(max(hw, 16)))
        jit(_channel_stats_kernel)[(c, cdiv(n, rows))](f, sums, sq, pos, mx, n, c, hw, rows, BLOCK=block)
    batch = ChannelStats(count=n * hw, sum=sums, sum_sq=sq, count_positive=pos.long(), max=mx)
    return batch.merge(state)


def channel_stats(feat: Tensor, state: ChannelStats | None = None, backend: str = "auto") -> ChannelStats:
    """Fold the (N, C, H, W) batch ``feat`` into ``state`` (``None`` starts a new accumulation)."""
    impl = channel_stats_triton if resolve_backend(backend, feat) == "triton" else channel_stats_reference
    return impl(feat, state)

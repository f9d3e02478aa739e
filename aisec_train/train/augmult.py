"""Augmentation multiplicity (``train.augmult=K``; De et al. 2022, "Unlocking high-accuracy differentially private
image classification through scale", section 3.1): each record of a batch is seen as K random augmentations, and
its gradient is the mean of its K views' gradients, computed **before** clipping, so a record still contributes one
clipped gradient of norm <= C per step and the accounting is unchanged (one record, one sampling coin).

How, in two hooks:

1. :class:`AugMult` wraps the step's objective: the batch ``(B, C, H, W)`` becomes ``(B * K, C, H, W)`` (record
   ``i``'s views are rows ``i * K .. i * K + K - 1``), each view randomly shifted (reflect-padded crop, De et al.'s
   4 pixels on 32x32, ``max(1, side // 8)`` in general) and, with ``train.augmult_flip``, mirrored; the labels
   repeat. The loss is the mean over all B * K rows, i.e. the mean over records of each record's mean over views.
2. Under DP, :func:`install` makes the Opacus optimizer average each record's K rows of every per-sample gradient
   (``p.grad_sample`` ``(B * K, ...)`` -> ``(B, ...)``) right before it clips. Opacus scales a mean-reduced loss's
   per-sample gradients by the rows it saw (B * K), so row ``j`` holds the gradient of view ``j``'s own loss and
   their mean is the gradient of the record's mean-over-views loss: what jax_privacy computes with ``vmap`` over
   records. Clipping, noise (scaled by the expected number of records) and the accountant then see B records.

**``train.max_physical_batch_size`` counts records, not rows.** Opacus' ``BatchMemoryManager`` splits the logical
batch into physical batches of at most that many records *before* :class:`AugMult` expands them, so a record's K
views always travel in one physical batch (their rows must meet in one ``p.grad_sample`` to be averaged) and a
forward holds up to ``max_physical_batch_size * K`` rows: size it for memory as ``rows / K``. Tested in
tests/test_augmult.py (``..._counts_records_and_a_records_views_travel_together``).

This needs instantiated per-sample gradients: ``privacy.grad_sample_mode=hooks`` (ghost clipping and the bk engine
only ever form per-row norms, so they cannot average rows first; refused in one line by :func:`check`).

>>> objective = AugMult(CrossEntropy(), k=4, flip=True)      # the loop wraps its objective like this
>>> install(dp_optimizer, k=4)                               # and the private optimizer, once
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

from aisec_train.errors import ConfigError

# The most views per record train.augmult takes: De et al. found gains up to K = 16 and used at most 32; each step
# forwards max_physical_batch_size * K rows, so K = 10^5 failed to allocate after the run had started.
MAX_AUGMULT = 256


def views(x: Tensor, k: int, *, pad: int | None = None, flip: bool = False, generator=None) -> Tensor:
    """``(B, C, H, W)`` -> ``(B * K, C, H, W)``: K random shifts (and flips) of each image, record-major."""
    b, _, h, w = x.shape
    p = max(1, min(h, w) // 8) if pad is None else pad
    tiled = x.repeat_interleave(k, dim=0)
    n = len(tiled)
    padded = nn.functional.pad(tiled, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, :, None]  # (n, H, 1)
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, :]  # (n, 1, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    # Copied into the input's own layout: the gather leaves channels-last strides, which .contiguous() keeps when
    # C == 1 (both layouts count as contiguous), and Opacus' conv hooks then returned all-zero per-sample gradients.
    return torch.empty_like(tiled).copy_(out)


class AugMult:
    """The objective ``inner`` on K augmented views of every record (see the module docstring)."""

    def __init__(self, inner: Any, k: int, *, flip: bool = False, pad: int | None = None):
        self.inner, self.k, self.flip, self.pad = inner, k, flip, pad
        self.name = f"{inner.name}+augmult{k}"
        self.forwards = inner.forwards

    def __call__(self, model, attacked, x: Tensor, y: Tensor, criterion):
        xs = views(x, self.k, pad=self.pad, flip=self.flip)
        loss, logits = self.inner(model, attacked, xs, y.repeat_interleave(self.k, dim=0), criterion)
        # the loop counts accuracy per record: the mean of a record's view logits
        return loss, logits.reshape(len(y), self.k, *logits.shape[1:]).mean(1)


def average_views(optimizer, k: int) -> None:
    """Every parameter's per-sample gradient ``(B * K, ...)`` -> ``(B, ...)``, each record the mean of its views."""
    for p in optimizer.params:
        g = getattr(p, "grad_sample", None)
        if g is None:
            continue
        if isinstance(g, list):  # several forward passes accumulated: Opacus concatenates them row-wise
            g = torch.cat(g, dim=0)
        if len(g) % k:
            raise RuntimeError(f"augmult: {len(g)} per-sample rows are not K={k} views per record")
        p.grad_sample = g.reshape(len(g) // k, k, *g.shape[1:]).mean(1)


def install(optimizer, k: int) -> None:
    """Make the Opacus DP optimizer average each record's K view-rows before it clips (once per optimizer)."""
    if getattr(optimizer, "_augmult_k", None) is not None:
        return
    original = optimizer.clip_and_accumulate

    def clip_and_accumulate(self):
        average_views(self, k)
        return original()

    optimizer.clip_and_accumulate = types.MethodType(clip_and_accumulate, optimizer)
    optimizer._augmult_k = k


def check(cfg) -> None:
    """Refuse, before any work, combinations where K views could not form one clipped gradient per record."""
    k = cfg.train.augmult
    if k <= 1 and cfg.train.augmult_flip:  # the flip only mirrors augmult's views: with one view it never ran
        raise ConfigError(
            "train.augmult_flip=True is not allowed with train.augmult=1: it mirrors augmult's K views, and one "
            "record is one unaugmented view; allowed: train.augmult=K >= 2, or dataset.augment.horizontal_flip=true "
            "to mirror the records themselves"
        )
    if k <= 1:
        return
    if k > MAX_AUGMULT:  # K copies of every physical batch are one forward: 10^5 failed to allocate at the first step
        raise ConfigError(
            f"train.augmult={k} is not allowed: at most {MAX_AUGMULT} views per record (De et al. 2022 use up to 32; "
            f"a step forwards train.max_physical_batch_size * K rows at once)"
        )
    from aisec_train.robust.config import RobustMode
    from aisec_train.train.config import GradSampleMode, PrivacyMode

    if cfg.privacy.mode is PrivacyMode.dpsgd and cfg.privacy.grad_sample_mode is not GradSampleMode.hooks:
        raise ConfigError(
            f"train.augmult={k} is not allowed with privacy.grad_sample_mode={cfg.privacy.grad_sample_mode.value}: "
            "averaging a record's views before clipping needs its per-sample gradients instantiated; "
            "allowed: privacy.grad_sample_mode=hooks, or train.augmult=1"
        )
    if cfg.robustness.mode is RobustMode.trades:
        raise ConfigError(
            f"train.augmult={k} is not allowed with robustness=trades (two forwards per record); allowed: "
            "train.augmult=1, or robustness=none|pgd_at|fgsm_rs"
        )

"""The Gaussian mechanism's draw, grouped: Opacus' secure-mode noise without its per-tensor overhead.

Opacus' ``add_noise`` draws, for each parameter tensor, one discarded value and then four Gaussians it sums (into a
fresh zero tensor) and halves: ``_generate_noise`` with ``secure_mode``, the fix for the floating-point attack on
the Gaussian mechanism (Holohan & Braghin 2021). That is about ten ops per tensor; on the MLP-Mixer (62 tensors)
and the small ``cnn`` they cost more than the draws themselves. :func:`flat_secure_noise` installs the same
mechanism drawn per group of tensors (up to 1M floats together): one discarded value per step, four draws of the
group's length summed in place, then ``p.grad = p.summed_grad + 0.5 * sum`` for each tensor. The distribution is
exactly Opacus' (per coordinate, half the sum of four independent ``N(0, std^2)`` draws from the optimizer's own
generator); only how the generator's stream is split over coordinates differs. With ``secure_mode`` off it draws
once, as Opacus does then. Measured in ``benchmarks/results/cpu/flat_noise.json`` (``benchmarks/flat_noise.py``).

    >>> opt = DPOptimizerFastGradientClipping(torch.optim.SGD([p], lr=0.1), noise_multiplier=1.0,
    ...                                       max_grad_norm=1.0, expected_batch_size=8)
    >>> flat_secure_noise(opt)  # True: opt.add_noise now draws per group
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

_GROUP_FLOATS = 1 << 20  # parameters drawn together up to this many floats (4 MB): few ops, bounded transient memory


def flat_secure_noise(optimizer: DPOptimizer) -> bool:
    """Replace ``optimizer.add_noise`` by the grouped draw; False (and Opacus' own kept) where it does not apply.

    Only Opacus' base ``add_noise`` is replaced: a subclass that overrides it (the data-parallel optimizers add the
    noise on rank 0 only) keeps its own. Parameters on several devices or of several dtypes keep Opacus' loop too.
    """
    base = (DPOptimizer.add_noise, DPOptimizerFastGradientClipping.add_noise)
    if type(optimizer).add_noise not in base:
        return False
    params = list(optimizer.params)
    if not params or len({(p.device, p.dtype) for p in params}) > 1:
        return False
    groups = _groups(params)
    optimizer.add_noise = lambda: _add_grouped_noise(optimizer, groups)
    return True


def _groups(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive parameters up to ``_GROUP_FLOATS`` floats together; a larger one alone. Buffers are made per
    step, after the backward has freed the activations, so they never add to the step's peak memory."""
    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        if groups[-1] and size + p.numel() > _GROUP_FLOATS:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    return groups


def _add_grouped_noise(optimizer: DPOptimizer, groups: list[list[torch.Tensor]]) -> None:
    multiplier = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)  # Opacus' rule
    std = multiplier * optimizer.max_grad_norm
    generator, secure = optimizer.generator, optimizer.secure_mode
    device = groups[0][0].device
    if std != 0 and secure:
        torch.normal(0.0, std, size=(1, 1), device=device, generator=generator)  # discarded, as Opacus does
    for group in groups:
        sums = [p.summed_grad for p in group]
        for summed in sums:
            _check_processed_flag(summed)
        noise, half = _draw(std, sum(s.numel() for s in sums), device, generator, secure)
        start = 0
        for p, summed in zip(group, sums, strict=True):
            size = summed.numel()
            if noise is None:  # std 0: Opacus adds zeros
                p.grad = summed.clone().view_as(p)
            else:
                piece = noise[start : start + size].view_as(summed).to(summed.dtype)
                p.grad = torch.add(summed, piece, alpha=half).view_as(p)
            start += size
            _mark_as_processed(summed)


def _draw(std: float, n: int, device, generator, secure: bool) -> tuple[torch.Tensor | None, float]:
    """``n`` floats of noise and the factor they are added with: four draws summed and 0.5 (secure mode: Opacus
    draws these in float32 whatever the parameters' dtype), or one draw and 1; ``None`` for ``std`` 0."""
    if std == 0:
        return None, 1.0
    noise = torch.empty(n, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator)
    if not secure:
        return noise, 1.0
    draw = torch.empty_like(noise)
    for _ in range(3):
        noise.add_(draw.normal_(0.0, std, generator=generator))
    return noise, 0.5

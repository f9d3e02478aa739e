"""FAB-T (Croce & Hein, ICML 2020): the targeted Fast Adaptive Boundary attack of AutoAttack.

FAB looks for the smallest perturbation that crosses the decision boundary. Each iteration linearises the
boundary between the true class ``y`` and a target ``t`` at the current point ``x1``,
``{z : f_t(z) - f_y(z) = 0}`` ~ ``{z : w . z = b}``, projects both ``x1`` and the clean ``x0`` onto that
hyperplane within the [0, 1] box (:func:`boundary_projection`), and moves to a convex combination of the two
projections, biased towards ``x0`` by ``alpha = min(|d1| / (|d1| + |d2|), alpha_max)`` and overshooting by
``eta``. When the new point is adversarial it is kept if it is the closest so far and the search backs off
towards ``x0`` by ``beta``. FAB-T runs once per target class (the 2nd, 3rd, ... highest clean logit).

A sample counts as fooled once FAB holds an adversarial example within ``eps`` of it; from then on it is
dropped, because a closer one cannot change the robust-accuracy verdict. One forward-backward (the
gradient of ``f_t - f_y``) and one forward (the adversarial check) per iteration, as in the reference.

>>> res = fab_targeted(model, x, y, eps=8 / 255)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attacks import attack_mode, loss_gradient
from .outcome import AttackResult, Rows, check_attack_args, lp_norm, predictions, sphere_start


def boundary_projection(t: Tensor, w: Tensor, b: Tensor, norm: str) -> Tensor:
    """The smallest ``d`` (Linf or L2) with ``w . (t + d) = b`` and ``0 <= t + d <= 1``, per row of (N, D).

    Along the optimal direction every coordinate moves by ``|d_i| = min(mu * a_i, cap_i)`` (``a_i = 1`` for
    Linf, ``|w_i|`` for L2), where ``cap_i`` is how far the box lets it move towards the hyperplane. The gap
    ``w . t - b`` closes as a piecewise-linear, non-decreasing function of ``mu`` with a kink at each
    ``cap_i / a_i``; sorting the kinks and a cumulative sum give, for every row at once, the segment where the
    gap closes and the exact ``mu`` inside it. Where the box cannot close the gap, every coordinate moves by its
    full cap (as in the reference ``projection_linf`` / ``projection_l2``).
    """
    gap = (w * t).sum(1) - b
    w = torch.where(gap[:, None] >= 0, w, -w)  # orient w so that the gap to close is >= 0
    gap = gap.abs()
    absw = w.abs()
    cap = torch.where(w > 0, t, 1.0 - t)  # moving against w lowers w . t; the box allows this much
    a = torch.ones_like(w) if norm == "linf" else absw
    kink = torch.where(a > 0, cap / a.clamp_min(1e-30), torch.inf)
    kink, order = kink.sort(dim=1)
    slope = (absw * a).gather(1, order)  # d(closed gap)/d(mu) while a coordinate is below its cap
    full = (absw * cap).gather(1, order)  # gap closed by a coordinate at its cap
    closed_before = full.cumsum(1) - full  # by coordinates capped before kink k
    slope_after = slope.flip(1).cumsum(1).flip(1)  # of coordinates still free at kink k
    closed_at = closed_before + torch.where(slope_after > 0, kink * slope_after, 0.0)
    k = (closed_at < gap[:, None]).sum(1, keepdim=True)
    reachable = k.squeeze(1) < w.shape[1]
    k = k.clamp(max=w.shape[1] - 1)
    mu = (gap[:, None] - closed_before.gather(1, k)) / slope_after.gather(1, k).clamp_min(1e-30)
    mu = torch.where(reachable[:, None], mu, torch.inf)
    move = torch.where(a > 0, torch.minimum(mu * a, cap), 0.0)  # (inf * 0 would be nan where w_i = 0)
    return -w.sign() * move


def _target_margin(logits: Tensor, pair: Tensor) -> Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, pair[:, 1]] - logits[rows, pair[:, 0]]  # f_t - f_y: > 0 past the boundary


@dataclass
class _State(Rows):
    x0: Tensor  # flattened clean samples
    pair: Tensor  # (true, target) class
    x1: Tensor  # flattened current point
    adv: Tensor  # closest adversarial example so far
    dist: Tensor  # its distance (inf: none yet)


def fab_run(
    model: nn.Module,
    x: Tensor,
    pair: Tensor,
    *,
    eps: float,
    norm: str,
    steps: int,
    x_init: Tensor,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """One FAB-T run from ``x_init`` towards ``pair[:, 1]``; returns (x_adv, fooled within eps)."""
    n, shape = x.shape[0], x.shape[1:]
    out_adv, out_fooled = x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    inf = torch.full((n,), torch.inf, device=x.device, dtype=x.dtype)
    s = _State(torch.arange(n, device=x.device), x.flatten(1), pair, x_init.flatten(1), x.flatten(1), inf)
    for _ in range(steps):
        grad, _, margin = loss_gradient(model, s.x1.view(-1, *shape), s.pair, _target_margin)
        w = grad.flatten(1)
        b = (w * s.x1).sum(1) - margin  # the linearised boundary w . z = b through the current point
        m = len(s)
        d = boundary_projection(torch.cat([s.x1, s.x0]), torch.cat([w, w]), torch.cat([b, b]), norm)
        d1, d2 = d[:m], d[m:]
        a1, a2 = lp_norm(d1, norm).clamp_min(1e-8), lp_norm(d2, norm).clamp_min(1e-8)
        alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max)[:, None]
        x1 = ((s.x1 + eta * d1) * (1 - alpha) + (s.x0 + eta * d2) * alpha).clamp(0.0, 1.0)
        is_adv = predictions(model, x1.view(-1, *shape)) != s.pair[:, 0]
        dist = lp_norm(x1 - s.x0, norm)
        closer = is_adv & (dist < s.dist)
        s.adv = torch.where(closer[:, None], x1, s.adv)
        s.dist = torch.where(closer, dist, s.dist)
        s.x1 = torch.where(is_adv[:, None], s.x0 + (x1 - s.x0) * beta, x1)  # back off towards the clean point
        done = s.dist <= eps
        if bool(done.any()):
            out_adv[s.idx[done]] = s.adv[done].view(-1, *shape)
            out_fooled[s.idx[done]] = True
            s.keep(~done)
            if len(s) == 0:
                break
    return out_adv, out_fooled


def fab_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int = 0,
) -> AttackResult:
    """FAB-T towards each runner-up class in turn; restarts after the first start at a random point on the
    sphere of radius eps / 2 (the reference's restart rule). Only clean-correct samples are attacked."""
    check_attack_args(eps=eps, norm=norm, steps=steps, restarts=restarts, n_target_classes=n_target_classes)
    x = x.detach()
    y = y.to(x.device)
    with attack_mode(model):
        with torch.no_grad():
            clean = model(x).float()
        robust = clean.argmax(1) == y
        ranked = clean.argsort(dim=1, descending=True)
        x_adv = x.clone()
        run = 0
        for rank in range(1, min(n_target_classes, clean.shape[1] - 1) + 1):
            for restart in range(restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return AttackResult(x_adv, robust)
                start = x[idx] if restart == 0 else sphere_start(x[idx], eps=eps / 2, norm=norm, seed=seed + run)
                run += 1
                pair = torch.stack([y[idx], ranked[idx, rank]], 1)
                kw = dict(eps=eps, norm=norm, steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)
                adv, fooled = fab_run(model, x[idx], pair, x_init=start, **kw)
                x_adv[idx[fooled]] = adv[fooled]
                robust[idx[fooled]] = False
    return AttackResult(x_adv, robust)

"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): the black-box, score-based member of
AutoAttack. It reads only the model's scores, so it is blind to masked or obfuscated gradients: a Square
success where the white-box attacks failed is the classic sign of gradient masking.

Random search on the margin ``z_y - max_{j != y} z_j``: every query changes one random square window per
sample and keeps the change if the margin drops. Linf starts from vertical stripes of +-eps and sets a window
to +-eps per channel; L2 starts from a grid of eps-normalised bumps and moves the mass of one window into
another. The window's share of the image ``p`` follows the reference schedule from ``p_init = 0.8`` (halving at
queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000; ``rescale_schedule`` stretches it to ``n_queries``
as torchattacks does by default, AutoAttack's standard version does not). Unlike the batched references,
which move one window shared by the whole batch, each sample draws its own window, sign and orientation, as
in the paper, so a sample's search does not depend on the batch it shares. A fooled sample is dropped.

>>> res = square(model, x, y, eps=8 / 255, n_queries=5000)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aisec_train.errors import require

from .attacks import attack_mode, project
from .outcome import AttackResult, Rows, check_attack_args, generator, lp_norm, per_sample

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # query counts after which p halves


def p_selection(it: int, *, p_init: float = 0.8, n_queries: int = 10000, rescale: bool = False) -> float:
    """The fraction of the image the window covers at query ``it``."""
    if rescale:
        it = int(it / n_queries * 10000)
    return p_init / 2 ** sum(it > bound for bound in _HALVINGS)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j``: <= 0 once the sample is misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return z_y - logits.scatter(1, y[:, None], -torch.inf).amax(1)


def _eta_rectangle(rows: int, cols: int, device: torch.device) -> Tensor:
    """Concentric squares of weight ``sum_{k >= ring} 1/(k+1)^2``, L2-normalised: one half of an L2 bump."""
    if rows == 0:
        return torch.zeros(0, cols, device=device)
    ring = torch.maximum(
        (torch.arange(rows, device=device) - rows // 2).abs()[:, None],
        (torch.arange(cols, device=device) - cols // 2).abs()[None, :],
    )
    k = max(rows // 2 + 1, cols // 2 + 1)
    tail = (1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32) ** 2).flip(0).cumsum(0).flip(0)
    bump = tail[ring]
    return bump / bump.norm()


def eta(side: int, device: torch.device) -> Tensor:
    """The L2 window pattern: a positive bump over a negative one, unit L2 norm (transpose drawn by caller)."""
    half = side // 2
    pattern = torch.cat([_eta_rectangle(half, side, device), -_eta_rectangle(side - half, side, device)])
    return pattern / pattern.norm()


def _signs(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen, device=device).float() * 2 - 1


def _corners(m: int, side: int, h: int, w: int, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    vh = torch.randint(0, h - side + 1, (m,), generator=gen, device=device)
    vw = torch.randint(0, w - side + 1, (m,), generator=gen, device=device)
    return vh, vw


def _window_mask(vh: Tensor, vw: Tensor, side: int, h: int, w: int) -> Tensor:
    rows = torch.arange(h, device=vh.device)[None, :] - vh[:, None]
    cols = torch.arange(w, device=vw.device)[None, :] - vw[:, None]
    inside = ((rows >= 0) & (rows < side))[:, :, None] & ((cols >= 0) & (cols < side))[:, None, :]
    return inside[:, None].float()  # (m, 1, h, w)


def _window_index(vh: Tensor, vw: Tensor, side: int, w: int, channels: int) -> Tensor:
    """Flat (h * w) indices of each sample's side x side window, expanded over channels: (m, c, side^2)."""
    offs = torch.arange(side, device=vh.device)
    flat = ((vh[:, None] + offs)[:, :, None] * w + (vw[:, None] + offs)[:, None, :]).flatten(1)
    return flat[:, None, :].expand(-1, channels, -1)


@dataclass
class _State(Rows):
    x: Tensor
    y: Tensor
    best: Tensor
    margin: Tensor


def _linf_init(x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
    n, c, _, w = x.shape
    return (x + eps * _signs((n, c, 1, w), gen, x.device)).clamp(0.0, 1.0)


def _linf_proposal(s: _State, it: int, eps: float, sched: dict, gen: torch.Generator, backend: str) -> Tensor:
    m, c, h, w = s.x.shape
    side = min(max(int(round(math.sqrt(p_selection(it, **sched) * h * w))), 1), h, w)
    vh, vw = _corners(m, side, h, w, gen, s.x.device)
    change = _window_mask(vh, vw, side, h, w) * (2 * eps) * _signs((m, c, 1, 1), gen, s.x.device)
    return project(s.best + change, s.x, eps=eps, norm="linf", backend=backend)


def _l2_init(x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
    n, c, h, w = x.shape
    side = max(h // 5, 1)
    start = (h - side * 5) // 2
    delta = torch.zeros_like(x)
    for vh in range(start, start + (h // side) * side, side):  # windows past the edge are cut, as in the reference
        for vw in range(start, start + (w // side) * side, side):
            bump = _oriented_eta(1, side, gen, x.device)
            delta[:, :, vh : vh + side, vw : vw + side] += bump[:, None, : h - vh, : w - vw] * _signs(
                (n, c, 1, 1), gen, x.device
            )
    return (x + eps * delta / (per_sample(lp_norm(delta, "l2"), x) + 1e-12)).clamp(0.0, 1.0)


def _oriented_eta(m: int, side: int, gen: torch.Generator, device: torch.device) -> Tensor:
    pattern = eta(side, device)
    flip = torch.randint(0, 2, (m, 1, 1), generator=gen, device=device).bool()
    return torch.where(flip, pattern.T[None], pattern[None])  # (m, side, side)


def _l2_proposal(s: _State, it: int, eps: float, sched: dict, gen: torch.Generator) -> Tensor:
    m, c, h, w = s.x.shape
    side = max(int(round(math.sqrt(p_selection(it, **sched) * h * w))), 3)
    side = min(side + (side % 2 == 0), h, w)  # odd, as in the reference
    delta = s.best - s.x
    (vh, vw), (vh2, vw2) = _corners(m, side, h, w, gen, s.x.device), _corners(m, side, h, w, gen, s.x.device)
    index = _window_index(vh, vw, side, w, c)
    window = delta.flatten(2).gather(2, index).view(m, c, side, side)
    both = torch.maximum(_window_mask(vh, vw, side, h, w), _window_mask(vh2, vw2, side, h, w))
    in_windows = (delta * both).pow(2).sum((2, 3), keepdim=True)
    image = per_sample(lp_norm(delta, "l2"), delta) ** 2
    new = _oriented_eta(m, side, gen, s.x.device)[:, None] * _signs((m, c, 1, 1), gen, s.x.device)
    new = new + window / (1e-12 + window.pow(2).sum((2, 3), keepdim=True).sqrt())
    budget = ((eps**2 - image).clamp_min(0.0) / c + in_windows).sqrt()
    new = new / (1e-12 + new.pow(2).sum((2, 3), keepdim=True).sqrt()) * budget
    delta = delta * (1 - _window_mask(vh2, vw2, side, h, w))  # the second window's mass moves into the first
    delta = delta.flatten(2).scatter(2, index, new.flatten(2)).view_as(delta)
    return (s.x + eps * delta / (per_sample(lp_norm(delta, "l2"), delta) + 1e-12)).clamp(0.0, 1.0)


@torch.no_grad()
def _square_run(model, x, y, *, eps, norm, n_queries, sched, seed, backend) -> tuple[Tensor, Tensor]:
    gen = generator(seed, x.device)
    best = _linf_init(x, eps, gen) if norm == "linf" else _l2_init(x, eps, gen)
    s = _State(torch.arange(x.shape[0], device=x.device), x, y, best, margin(model(best).float(), y))
    out_adv, out_fooled = best.clone(), s.margin <= 0
    shrink_every = 1 if not x.is_cuda else 10  # a fooled-check syncs a GPU; on the CPU it is free
    for it in range(n_queries):
        if it % shrink_every == 0:
            done = s.margin <= 0
            if bool(done.any()):
                out_adv[s.idx[done]], out_fooled[s.idx[done]] = s.best[done], True
                s.keep(~done)
            if len(s) == 0:
                break
        if norm == "linf":
            x_new = _linf_proposal(s, it, eps, sched, gen, backend)
        else:
            x_new = _l2_proposal(s, it, eps, sched, gen)
        new_margin = margin(model(x_new).float(), s.y)
        better = new_margin < s.margin
        s.best = torch.where(per_sample(better, x_new), x_new, s.best)
        s.margin = torch.where(better, new_margin, s.margin)
    done = s.margin <= 0
    out_adv[s.idx] = s.best
    out_fooled[s.idx[done]] = True
    return out_adv, out_fooled


def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    n_queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    rescale_schedule: bool = False,
    seed: int = 0,
    backend: str = "auto",
) -> AttackResult:
    """Untargeted Square Attack (margin loss) on (N, C, H, W) images; only clean-correct samples are attacked,
    and each restart attacks those still robust. ``n_queries`` counts model queries per sample after the start."""
    check_attack_args(eps=eps, norm=norm, n_queries=n_queries, restarts=restarts)
    require(x.dim() == 4, "square input shape", tuple(x.shape), "must be (N, C, H, W) images")
    require(0 < p_init <= 1, "p_init", p_init, "must be in (0, 1]: the first window's share of the image")
    x = x.detach()
    y = y.to(x.device)
    sched = dict(p_init=p_init, n_queries=n_queries, rescale=rescale_schedule)
    with attack_mode(model):
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        x_adv = x.clone()
        for restart in range(restarts):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            kw = dict(eps=eps, norm=norm, n_queries=n_queries, sched=sched, seed=seed + restart, backend=backend)
            adv, fooled = _square_run(model, x[idx], y[idx], **kw)
            x_adv[idx] = adv
            robust[idx[fooled]] = False
    return AttackResult(x_adv, robust)

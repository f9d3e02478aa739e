"""APGD (Croce & Hein, ICML 2020): PGD without a step size to tune, the white-box half of AutoAttack.

A run starts on the eps-sphere, takes a first step of ``2 * eps``, then momentum steps
``x' = P(x + 0.75 (z - x) + 0.25 (x - x_prev))`` with ``z = P(x + step * d(grad))`` (``d`` = sign for Linf,
unit-L2 for L2, ``P`` the projection onto the ball and [0, 1]). At checkpoints (after 22% of the steps, then
windows shrinking by 3% of the steps down to 6%) every sample whose loss rose in at most ``rho = 75%`` of the
window's steps, or whose best loss did not improve since the last checkpoint while its step was not just
halved, halves its step and restarts from its best point. As in both reference implementations (fra31's
``autopgd_base.py``, torchattacks' ``apgd.py``), the first window compares its first loss against 0.

``apgd`` maximises cross-entropy (APGD-CE) or the DLR loss; ``apgd_targeted`` (APGD-T) maximises the targeted
DLR loss towards each of the ``n_target_classes`` runner-up classes in turn, on the samples still robust.
All samples are attacked at once; a misclassified one is recorded and dropped (on CUDA, at checkpoints, so the
loop does not synchronise every step). The projections are the fused ``pgd_update`` kernel (``project``).

>>> res = apgd(model, x, y, eps=8 / 255)  # doctest: +SKIP
>>> res.robust.float().mean()  # robust accuracy under APGD-CE  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from aisec_train.errors import require

from .attacks import attack_mode, loss_gradient, project
from .outcome import AttackResult, Rows, check_attack_args, check_classes, per_sample, sphere_start

LossFn = Callable[[Tensor, Tensor], Tensor]


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, per sample (>= 3 classes)."""
    top, idx = logits.topk(3, dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    runner_up = torch.where(idx[:, 0] == y, top[:, 1], top[:, 0])
    return -(z_y - runner_up) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_loss_targeted(logits: Tensor, y: Tensor, y_target: Tensor) -> Tensor:
    """Targeted DLR: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, per sample (>= 4 classes)."""
    top = logits.topk(4, dim=1).values
    z = logits.gather(1, torch.stack([y, y_target], 1))
    return -(z[:, 0] - z[:, 1]) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _dlr_pair(logits: Tensor, pair: Tensor) -> Tensor:
    return dlr_loss_targeted(logits, pair[:, 0], pair[:, 1])  # (true, target) travel as one (N, 2) tensor


LOSSES: dict[str, LossFn] = {"ce": _ce, "dlr": dlr_loss, "dlr-targeted": _dlr_pair}


def checkpoints(steps: int) -> list[tuple[int, int]]:
    """``(iteration, window)``: after 0-based iteration ``i`` the step size is checked over the last ``window``
    iterations. The first window is 22% of the steps; each next one shrinks by 3%, to no less than 6%."""
    window, smallest, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    marks, i = [], window - 1
    while i < steps:
        marks.append((i, window))
        window = max(window - shrink, smallest)
        i += window
    return marks


@dataclass
class RunResult:
    x_adv: Tensor  # the first misclassified point where fooled, else the highest-loss point
    fooled: Tensor  # (N,) bool
    loss_best: Tensor  # (N,) highest loss reached (up to the step a fooled sample was dropped)


@dataclass
class _State(Rows):
    nat: Tensor
    target: Tensor
    labels: Tensor
    x: Tensor
    x_prev: Tensor
    grad: Tensor
    x_best: Tensor
    grad_best: Tensor
    loss_best: Tensor
    step: Tensor
    prev_loss: Tensor
    rises: Tensor
    best_at_check: Tensor
    halved: Tensor
    fooled: Tensor
    adv: Tensor


def apgd_run(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    loss: str,
    eps: float,
    norm: str,
    steps: int,
    x_init: Tensor,
    rho: float = 0.75,
    backend: str = "auto",
    autocast_bf16: bool = False,
) -> RunResult:
    """One APGD run from ``x_init``; ``model`` is already in :func:`attack_mode`.

    ``target`` is the label tensor (N,) for ``"ce"``/``"dlr"``, or (N, 2) rows of (true, target) class for
    ``"dlr-targeted"``; success always means the true class is no longer predicted.
    """
    loss_fn = LOSSES[loss]
    grad, logits, value = loss_gradient(model, x_init, target, loss_fn, autocast_bf16=autocast_bf16)
    labels = target if target.dim() == 1 else target[:, 0]
    n = x.shape[0]
    out = RunResult(x_init.clone(), torch.zeros(n, dtype=torch.bool, device=x.device), value.clone())
    s = _State(
        idx=torch.arange(n, device=x.device),
        nat=x,
        target=target,
        labels=labels,
        x=x_init,
        x_prev=x_init,
        grad=grad,
        x_best=x_init,
        grad_best=grad,
        loss_best=value,
        step=torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype),
        prev_loss=torch.zeros_like(value),  # the references' first window compares against an unfilled 0
        rises=torch.zeros_like(value),
        best_at_check=value,
        halved=torch.ones(n, dtype=torch.bool, device=x.device),
        fooled=logits.argmax(1) != labels,
        adv=x_init,
    )
    marks = dict(checkpoints(steps))
    every_step = not x.is_cuda  # on the CPU a sync is free: shrink the batch as soon as a sample is fooled
    for i in range(steps):
        _step(s, i > 0, eps=eps, norm=norm, backend=backend)
        grad, logits, value = loss_gradient(model, s.x, s.target, loss_fn, autocast_bf16=autocast_bf16)
        _record(s, grad, logits, value)
        if i in marks:
            _check_step_size(s, marks[i], rho)
        if (every_step or i in marks) and bool(s.fooled.any()):
            _retire(s, out, s.fooled)
            s.keep(~s.fooled)
        if len(s) == 0:
            break
    _retire(s, out, torch.ones_like(s.fooled))
    return out


def _step(s: _State, momentum: bool, *, eps: float, norm: str, backend: str) -> None:
    if norm == "linf":
        direction = s.grad.sign()
    else:
        direction = s.grad / (per_sample(s.grad.flatten(1).norm(dim=1), s.grad) + 1e-12)
    z = project(s.x + per_sample(s.step, s.x) * direction, s.nat, eps=eps, norm=norm, backend=backend)
    if momentum:
        z = project(s.x + 0.75 * (z - s.x) + 0.25 * (s.x - s.x_prev), s.nat, eps=eps, norm=norm, backend=backend)
    s.x_prev, s.x = s.x, z


def _record(s: _State, grad: Tensor, logits: Tensor, value: Tensor) -> None:
    s.grad = grad
    newly = (logits.argmax(1) != s.labels) & ~s.fooled
    s.adv = torch.where(per_sample(newly, s.x), s.x, s.adv)
    s.fooled = s.fooled | newly
    better = value > s.loss_best
    b = per_sample(better, s.x)
    s.x_best, s.grad_best = torch.where(b, s.x, s.x_best), torch.where(b, grad, s.grad_best)
    s.loss_best = torch.where(better, value, s.loss_best)
    s.rises = s.rises + (value > s.prev_loss).to(s.rises.dtype)
    s.prev_loss = value


def _check_step_size(s: _State, window: int, rho: float) -> None:
    reduce = (s.rises <= window * rho) | (~s.halved & (s.best_at_check >= s.loss_best))
    s.halved, s.best_at_check, s.rises = reduce, s.loss_best, torch.zeros_like(s.rises)
    s.step = torch.where(reduce, s.step / 2, s.step)
    r = per_sample(reduce, s.x)
    s.x, s.grad = torch.where(r, s.x_best, s.x), torch.where(r, s.grad_best, s.grad)


def _retire(s: _State, out: RunResult, rows: Tensor) -> None:
    """Write the finished ``rows`` of the running batch into the run's result."""
    idx = s.idx[rows]
    fooled = s.fooled[rows]
    out.x_adv[idx] = torch.where(per_sample(fooled, s.x[rows]), s.adv[rows], s.x_best[rows])
    out.fooled[idx] = fooled
    out.loss_best[idx] = s.loss_best[rows]


def _cascade(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    runs: Callable[[Tensor], Iterator[tuple[str, Callable[[Tensor], Tensor]]]],
    *,
    eps: float,
    norm: str,
    steps: int,
    rho: float,
    seed: int,
    backend: str,
    autocast_bf16: bool,
) -> AttackResult:
    """Run APGD runs one after another, each on the samples every earlier run left robust."""
    x = x.detach()
    y = y.to(x.device)
    with attack_mode(model):
        with torch.no_grad():
            clean = model(x).float()
        robust = clean.argmax(1) == y
        x_adv = x.clone()
        for k, (loss, make_target) in enumerate(runs(clean)):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_start = sphere_start(x[idx], eps=eps, norm=norm, seed=seed + k)
            res = apgd_run(
                model,
                x[idx],
                make_target(idx),
                loss=loss,
                eps=eps,
                norm=norm,
                steps=steps,
                x_init=x_start,
                rho=rho,
                backend=backend,
                autocast_bf16=autocast_bf16 and x.is_cuda,
            )
            x_adv[idx] = res.x_adv
            robust[idx[res.fooled]] = False
    return AttackResult(x_adv, robust)


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    seed: int = 0,
    backend: str = "auto",
    autocast_bf16: bool = False,
) -> AttackResult:
    """APGD-CE (``loss="ce"``) or APGD-DLR (``loss="dlr"``); each restart attacks the samples still robust."""
    check_attack_args(eps=eps, norm=norm, steps=steps, restarts=restarts)
    require(loss in ("ce", "dlr"), "loss", loss, "must be ce or dlr")

    def runs(clean: Tensor) -> Iterator[tuple[str, Callable[[Tensor], Tensor]]]:
        if loss == "dlr":
            check_classes(clean.shape[1], 3, "APGD-DLR")
        for _ in range(restarts):
            yield loss, lambda idx: y.to(x.device)[idx]

    kw = dict(eps=eps, norm=norm, steps=steps, rho=rho, seed=seed, backend=backend, autocast_bf16=autocast_bf16)
    return _cascade(model, x, y, runs, **kw)


def apgd_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    rho: float = 0.75,
    seed: int = 0,
    backend: str = "auto",
    autocast_bf16: bool = False,
    together: bool = False,
) -> AttackResult:
    """APGD-T: targeted DLR towards the 2nd, 3rd, ... highest clean logit in turn (at most classes - 1).

    ``together=True`` runs every (target, restart) pair as rows of one batch for ``steps`` iterations, instead of
    one run per target on the samples the earlier targets left robust. Each pair's run is the same APGD run (no
    quantity couples rows), only started from its own draw; a sample counts as fooled if any pair fools it. It
    attacks every surviving sample with every target, so it is never weaker, and it pays the per-iteration
    overhead once, not once per target: at the few dozen survivors of a small evaluation sample that overhead is
    most of an iteration's cost on the CPU (issue 24).
    """
    check_attack_args(eps=eps, norm=norm, steps=steps, restarts=restarts, n_target_classes=n_target_classes)
    kw = dict(eps=eps, norm=norm, steps=steps, rho=rho, seed=seed, backend=backend, autocast_bf16=autocast_bf16)
    if together:
        return _targets_together(model, x, y, n_target_classes=n_target_classes, restarts=restarts, **kw)

    def runs(clean: Tensor) -> Iterator[tuple[str, Callable[[Tensor], Tensor]]]:
        check_classes(clean.shape[1], 4, "APGD-T")
        ranked = clean.argsort(dim=1, descending=True)  # ranked[:, 0] is the prediction (= y where robust)
        labels = y.to(x.device)
        for rank in range(1, min(n_target_classes, clean.shape[1] - 1) + 1):
            for _ in range(restarts):
                yield "dlr-targeted", lambda idx, r=rank: torch.stack([labels[idx], ranked[idx, r]], 1)

    return _cascade(model, x, y, runs, **kw)


def _targets_together(
    model: nn.Module, x: Tensor, y: Tensor, *, n_target_classes: int, restarts: int, seed: int, **kw
) -> AttackResult:
    """APGD-T with every (target, restart) pair of every clean-correct sample as one row of one run."""
    x = x.detach()
    y = y.to(x.device)
    with attack_mode(model):
        with torch.no_grad():
            clean = model(x).float()
        check_classes(clean.shape[1], 4, "APGD-T")
        robust = clean.argmax(1) == y
        x_adv = x.clone()
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            return AttackResult(x_adv, robust)
        ranks = torch.arange(1, min(n_target_classes, clean.shape[1] - 1) + 1, device=x.device)
        pairs = len(ranks) * restarts
        rows = idx.repeat(pairs)  # pair-major: row j * len(idx) + i is sample idx[i] under pair j
        rank = ranks.repeat_interleave(restarts).repeat_interleave(len(idx))
        target = torch.stack([y[rows], clean.argsort(dim=1, descending=True)[rows, rank]], 1)
        x_rows = x[rows]
        x_start = sphere_start(x_rows, eps=kw["eps"], norm=kw["norm"], seed=seed)
        kw["autocast_bf16"] = kw["autocast_bf16"] and x.is_cuda
        res = apgd_run(model, x_rows, target, loss="dlr-targeted", x_init=x_start, **kw)
        fooled = res.fooled.view(pairs, len(idx))
        first = fooled.float().argmax(0)  # the first pair that fooled each sample (0 where none did)
        pick = first * len(idx) + torch.arange(len(idx), device=x.device)
        x_adv[idx] = res.x_adv[pick]
        robust[idx[fooled.any(0)]] = False
    return AttackResult(x_adv, robust)

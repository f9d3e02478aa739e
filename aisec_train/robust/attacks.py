"""Evasion attacks: FGSM and batched-restart PGD (Linf and L2) on inputs in [0, 1].

Both take gradients with respect to the input only, run the model in eval mode, and leave an Opacus-wrapped
model exactly as they found it (see :func:`attack_mode`), so the training loop can attack the very module it
is about to take a DP step with. The per-step arithmetic (step, projection, clamp, early-stop mask) is one
fused call to ``aisec_kernels.pgd_update``: a Triton kernel on CUDA, its torch reference on the CPU.

>>> x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=10)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from aisec_kernels import pgd_update, random_start
from torch import Tensor, nn
from torch.nn import functional as F

LO, HI = 0.0, 1.0  # the data range every dataset loader normalises to


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, Opacus hooks off and parameters frozen for the attack; each restored on exit.

    Opacus' GradSampleModule (hooks and ghost modes) records activations in forward hooks and per-sample
    gradients in backward hooks; ``disable_hooks()`` keeps an attack's passes out of that state. Freezing the
    parameters guarantees no parameter ``.grad`` is touched and saves autograd from building their graph
    nodes.
    """
    was_training = model.training
    hooks_were_on = getattr(model, "hooks_enabled", False)  # only Opacus' wrappers carry this flag
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    if hooks_were_on:
        model.disable_hooks()
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if hooks_were_on:
            model.enable_hooks()
        model.train(was_training)


def _bf16(enabled: bool) -> AbstractContextManager:
    if not enabled:
        return nullcontext()  # constructing a disabled autocast still costs Python time on every step
    # No weight-cast cache: CUDA-graph capture (graphed_pgd) requires it off, and PGD reuses no casts anyway.
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def input_gradient(
    model: nn.Module, x_adv: Tensor, y: Tensor, *, targeted: bool, autocast_bf16: bool
) -> tuple[Tensor, Tensor]:
    """Input gradient of the attacker's objective, and the logits it came from."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad(), _bf16(autocast_bf16):
        logits = model(x_adv)
        # A summed loss keeps each sample's gradient independent of the batch (and of the restarts beside it).
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        if targeted:
            loss = -loss  # descend towards the target class
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad, logits.detach()


def loss_gradient(
    model: nn.Module,
    x_adv: Tensor,
    target: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    autocast_bf16: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Input gradient of ``loss_fn(logits, target).sum()``, the logits and the per-sample loss.

    ``loss_fn`` maps float32 logits (N, K) and ``target`` to per-sample losses (N,): the attacks of
    Croce & Hein (DLR, margins) and TRADES' KL use it where :func:`input_gradient` fixes cross-entropy.
    Summing keeps each sample's gradient independent of the batch it shares.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad(), _bf16(autocast_bf16):
        logits = model(x_adv)
        per_sample = loss_fn(logits.float(), target)
    (grad,) = torch.autograd.grad(per_sample.sum(), x_adv)
    return grad, logits.detach(), per_sample.detach()


def project(x: Tensor, x_nat: Tensor, *, eps: float, norm: str = "linf", backend: str = "auto") -> Tensor:
    """``x`` projected onto the ``norm`` ball of radius ``eps`` around ``x_nat``, then clamped to [0, 1].

    A PGD update with a zero gradient is exactly that projection, so this is the fused ``pgd_update`` kernel
    (Triton on CUDA) for attacks whose step is not a plain signed or normalised gradient step (APGD's
    momentum, Square's random squares).
    """
    return pgd_update(x, x_nat, torch.zeros_like(x), eps=eps, step_size=0.0, norm=norm, lo=LO, hi=HI, backend=backend)


def _succeeded(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    pred = logits.argmax(dim=1)
    return pred == y if targeted else pred != y


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    backend: str = "auto",
) -> Tensor:
    """One gradient step of size ``eps`` (sign for Linf, unit-L2 for L2), clamped to [0, 1]."""
    x_nat = x.detach()
    with attack_mode(model):
        grad, _ = input_gradient(model, x_nat, y, targeted=targeted, autocast_bf16=False)
    return pgd_update(x_nat, x_nat, grad, eps=eps, step_size=eps, norm=norm, lo=LO, hi=HI, backend=backend)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    early_stop: bool = False,
    backend: str = "auto",
    seed: int = 0,
    autocast_bf16: bool = False,
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) with ``restarts`` random starts run as one batch.

    ``y`` holds the true labels (untargeted) or the target labels (``targeted=True``). Each sample keeps its
    strongest restart: one that succeeds if any does, else the one with the highest loss. ``early_stop``
    freezes samples that already succeed (an evaluation speed-up that can only make the attack stronger).
    ``autocast_bf16`` runs forward and backward in bfloat16 on CUDA and is ignored on the CPU.
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    n = x.shape[0]
    x_nat = x.detach().repeat(restarts, *([1] * (x.dim() - 1)))
    y_rep = y.repeat(restarts)
    bf16 = autocast_bf16 and x.is_cuda
    with attack_mode(model):
        x_adv = _start(x_nat, eps=eps, norm=norm, seed=seed, enabled=random_start, backend=backend)
        for _ in range(steps):
            grad, logits = input_gradient(model, x_adv, y_rep, targeted=targeted, autocast_bf16=bf16)
            active = ~_succeeded(logits, y_rep, targeted) if early_stop else None
            x_adv = pgd_update(
                x_adv,
                x_nat,
                grad,
                eps=eps,
                step_size=step_size,
                norm=norm,
                lo=LO,
                hi=HI,
                active=active,
                backend=backend,
            )
        if restarts == 1:
            return x_adv
        return _strongest(model, x_adv, y_rep, n, restarts, targeted=targeted, autocast_bf16=bf16)


def _start(x_nat: Tensor, *, eps: float, norm: str, seed: int, enabled: bool, backend: str) -> Tensor:
    if not enabled:
        return x_nat.clone()
    return random_start(x_nat, eps=eps, norm=norm, lo=LO, hi=HI, seed=seed, backend=backend)


@torch.no_grad()
def _strongest(
    model: nn.Module,
    x_adv: Tensor,
    y_rep: Tensor,
    n: int,
    restarts: int,
    *,
    targeted: bool,
    autocast_bf16: bool,
) -> Tensor:
    """Per sample, the restart that succeeds (if any does), else the one with the highest attacker loss."""
    with _bf16(autocast_bf16):
        logits = model(x_adv).float()
    loss = F.cross_entropy(logits, y_rep, reduction="none")
    score = -loss if targeted else loss
    score = torch.where(_succeeded(logits, y_rep, targeted), torch.inf, score)
    best = score.view(restarts, n).argmax(dim=0)
    return x_adv.view(restarts, n, *x_adv.shape[1:])[best, torch.arange(n, device=x_adv.device)]


def graphed_pgd(
    model: nn.Module, x_example: Tensor, y_example: Tensor, **pgd_kwargs: object
) -> Callable[[Tensor, Tensor], Tensor]:
    """``pgd`` with ``pgd_kwargs`` captured once in a CUDA graph for the example's batch shape.

    A PGD step on a small model is a few dozen short kernels, so on a GPU launch overhead, not arithmetic,
    bounds it; a replay launches the whole attack at once. The captured computation is exactly ``pgd``'s
    (same seed, same steps). Other shapes, and CPU tensors, fall back to plain ``pgd``. The model's weights
    are read at replay time, so the graph stays valid while they are trained in place, but not if parameters
    are re-allocated.
    """

    def eager(x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, **pgd_kwargs)

    if not x_example.is_cuda:
        return eager
    static_x, static_y = x_example.detach().clone(), y_example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, cuDNN picks its algorithms
        for _ in range(2):
            eager(static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = eager(static_x, static_y)

    def replay(x: Tensor, y: Tensor) -> Tensor:
        if x.shape != static_x.shape or y.shape != static_y.shape or x.device != static_x.device:
            return eager(x, y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    return replay

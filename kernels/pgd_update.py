"""Fused PGD step and seeded random start: Triton kernels beside the torch references they must equal.

One PGD step, in one pass over the batch::

    x' = clamp(proj_{B(x_nat, eps)}(x + step_size * d(grad)), lo, hi)   for active samples, x' = x otherwise

with ``d = sign`` for Linf and ``d = grad / ||grad||_2`` (per sample) for L2. Linf is elementwise, so its
kernel tiles each sample's row over a 2-D grid. L2 needs two per-sample norms (of the gradient, then of the
stepped perturbation) before it can write anything, so its kernel runs one program per sample row and sweeps
the row three times (norm of grad, norm of the new delta, write); a row is a few KB, so the re-reads come
from cache, and one launch replaces a norm kernel, a step kernel and a projection kernel.

>>> x_nat = torch.rand(4, 1, 8, 8)
>>> x = random_start(x_nat, eps=0.1, seed=0)
>>> x = pgd_update(x, x_nat, torch.randn_like(x), eps=0.1, step_size=0.025)
>>> bool(((x - x_nat).abs() <= 0.1 + 1e-6).all())
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import cdiv, jit, next_power_of_2, resolve_backend

tl = None  # bound to triton.language by dispatch.jit at the first launch (why: see dispatch.jit)

# Guards the L2 normalisations against an all-zero gradient or perturbation (torchattacks uses the same
# 1e-10).
_TINY = 1e-10


def _number(name: str, value: float, low: float | None = 0.0) -> float:
    """``value`` as a float, refused unless finite (and ``>= low``): a negative or NaN eps leaves the ball."""
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}={value!r}: must be a finite number") from None
    if not math.isfinite(v) or (low is not None and v < low):
        raise ValueError(f"{name}={value!r}: must be a finite number" + ("" if low is None else f" >= {low:g}"))
    return v


def _validate(
    norm: str,
    active: Tensor | None,
    n: int,
    *,
    eps: float,
    lo: float,
    hi: float,
    step_size: float = 0.0,
    tensors: dict[str, Tensor] | None = None,
) -> None:
    """Refuse, before any launch, what would read out of bounds or leave the eps-ball or [lo, hi]: every tensor
    of one shape, floating point, on one device; eps and step_size finite and >= 0; lo <= hi, both finite."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm={norm!r}: choose 'linf' or 'l2'")
    _number("eps", eps)
    _number("step_size", step_size)
    if _number("lo", lo, None) > _number("hi", hi, None):
        raise ValueError(f"lo={lo!r} > hi={hi!r}: the valid range [lo, hi] must not be empty")
    items = list((tensors or {}).items())
    for name, t in items:
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 1:
            what = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point (N, ...) tensor, got a {what}")
    first, ref = items[0] if items else ("", None)
    for name, t in items[1:]:
        if t.shape != ref.shape or t.device != ref.device:
            raise ValueError(
                f"{name} {tuple(t.shape)} on {t.device} must match {first} {tuple(ref.shape)} on {ref.device}"
            )
    if active is not None and (active.dtype != torch.bool or active.shape != (n,)):
        raise ValueError(f"active must be a bool tensor of shape ({n},), got {active.dtype} {tuple(active.shape)}")
    if active is not None and ref is not None and active.device != ref.device:
        raise ValueError(f"active is on {active.device} but {first} is on {ref.device}")


def _check_update(x, x_nat, grad, eps, step_size, norm, lo, hi, active) -> None:
    tensors = {"x": x, "x_nat": x_nat, "grad": grad}
    _validate(norm, active, _batch(x), eps=eps, step_size=step_size, lo=lo, hi=hi, tensors=tensors)


def _check_start(x_nat, eps, norm, lo, hi) -> None:
    _validate(norm, None, _batch(x_nat), eps=eps, lo=lo, hi=hi, tensors={"x_nat": x_nat})


def _batch(t) -> int:
    return t.shape[0] if isinstance(t, Tensor) and t.dim() else 0


# ----------------------------------------------------------------------------------------------- references
def pgd_update_reference(
    x: Tensor,
    x_nat: Tensor,
    grad: Tensor,
    *,
    eps: float,
    step_size: float,
    norm: str = "linf",
    lo: float = 0.0,
    hi: float = 1.0,
    active: Tensor | None = None,
) -> Tensor:
    """The eager torch chain the fused kernel must equal (computed in float32, returned in ``x.dtype``)."""
    _check_update(x, x_nat, grad, eps, step_size, norm, lo, hi, active)
    xf, nat, g = x.float(), x_nat.float(), grad.float()
    if norm == "linf":
        # In place on one fresh buffer: the eager chain allocates a tensor per op.
        out = g.sign().mul_(step_size).add_(xf).sub_(nat).clamp_(-eps, eps).add_(nat)
    else:
        flat = g.flatten(1)
        unit = flat / (flat.norm(dim=1, keepdim=True) + _TINY)
        delta = (xf - nat).flatten(1) + step_size * unit
        scale = (eps / (delta.norm(dim=1, keepdim=True) + _TINY)).clamp(max=1.0)
        out = nat + (delta * scale).view_as(xf)
    out = out.clamp_(lo, hi)
    if active is not None:
        out = torch.where(active.view(-1, *([1] * (x.dim() - 1))), out, xf)
    return out.to(x.dtype)


def random_start_reference(
    x_nat: Tensor, *, eps: float, norm: str = "linf", lo: float = 0.0, hi: float = 1.0, seed: int
) -> Tensor:
    """Uniform in the Linf ball, or uniform in the L2 ball (Gaussian direction, radius ``eps * U^(1/d)``)."""
    _check_start(x_nat, eps, norm, lo, hi)
    gen = torch.Generator(device=x_nat.device).manual_seed(seed)
    nat = x_nat.float()
    if norm == "linf":
        noise = (torch.rand(nat.shape, generator=gen, device=nat.device) * 2 - 1) * eps
    else:
        n, d = nat.shape[0], nat[0].numel()
        z = torch.randn((n, d), generator=gen, device=nat.device)
        radius = eps * torch.rand((n, 1), generator=gen, device=nat.device) ** (1.0 / d)
        noise = (z / (z.norm(dim=1, keepdim=True) + _TINY) * radius).view_as(nat)
    return (nat + noise).clamp(lo, hi).to(x_nat.dtype)


# ----------------------------------------------------------------------------------------------- kernels
def _pgd_linf_kernel(
    x_ptr,
    nat_ptr,
    g_ptr,
    active_ptr,
    out_ptr,
    D,
    eps,
    step,
    lo,
    hi,
    HAS_ACTIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = row.to(tl.int64) * D
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    nat = tl.load(nat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    delta = tl.minimum(tl.maximum(x + step * sign - nat, -eps), eps)
    out = tl.minimum(tl.maximum(nat + delta, lo), hi)
    if HAS_ACTIVE:
        out = tl.where(tl.load(active_ptr + row) != 0, out, x)
    tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _pgd_l2_kernel(
    x_ptr,
    nat_ptr,
    g_ptr,
    active_ptr,
    out_ptr,
    D,
    eps,
    step,
    lo,
    hi,
    tiny,
    HAS_ACTIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    # sweep 1: ||grad||^2
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        m = start + cols < D
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
        acc += g * g
    g_scale = step / (tl.sqrt(tl.sum(acc, axis=0)) + tiny)
    # sweep 2: ||x - nat + step * unit(grad)||^2
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        m = start + cols < D
        x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
        nat = tl.load(nat_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
        d = x - nat + g * g_scale
        acc += d * d
    d_scale = tl.minimum(eps / (tl.sqrt(tl.sum(acc, axis=0)) + tiny), 1.0)
    keep = 1
    if HAS_ACTIVE:
        keep = tl.load(active_ptr + row).to(tl.int32)
    # sweep 3: project, clamp, store
    for start in range(0, D, BLOCK):
        m = start + cols < D
        x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
        nat = tl.load(nat_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
        out = tl.minimum(tl.maximum(nat + (x - nat + g * g_scale) * d_scale, lo), hi)
        out = tl.where(keep != 0, out, x)
        tl.store(out_ptr + base + start + cols, out.to(out_ptr.dtype.element_ty), mask=m)


def _random_start_kernel(nat_ptr, out_ptr, D, eps, lo, hi, seed, total, tiny, L2: tl.constexpr, BLOCK: tl.constexpr):
    # One program per sample row; Philox counters are the flat element index, so a seed fixes every value.
    row = tl.program_id(0)
    base = row.to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    scale = eps
    if L2:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            m = start + cols < D
            z = tl.randn(seed, (base + start + cols).to(tl.int32))
            acc += tl.where(m, z * z, 0.0)
        u = tl.rand(seed, (total + row + cols * 0).to(tl.int32))  # one uniform per row (lane-broadcast)
        radius = eps * tl.exp(tl.log(tl.max(u, axis=0)) / D)  # eps * U^(1/d), the uniform-in-ball radius
        scale = radius / (tl.sqrt(tl.sum(acc, axis=0)) + tiny)
    for start in range(0, D, BLOCK):
        m = start + cols < D
        offs = (base + start + cols).to(tl.int32)
        if L2:
            noise = tl.randn(seed, offs) * scale
        else:
            noise = (tl.rand(seed, offs) * 2.0 - 1.0) * scale
        nat = tl.load(nat_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
        out = tl.minimum(tl.maximum(nat + noise, lo), hi)
        tl.store(out_ptr + base + start + cols, out.to(out_ptr.dtype.element_ty), mask=m)


def _rows(t: Tensor) -> Tensor:
    # Kernels index a dense (N, D) row-major view; a non-contiguous input pays one copy here.
    return t.reshape(t.shape[0], -1).contiguous()


def _block(d: int, cap: int = 4096) -> int:
    return min(cap, next_power_of_2(max(d, 16)))


def pgd_update_triton(
    x: Tensor,
    x_nat: Tensor,
    grad: Tensor,
    *,
    eps: float,
    step_size: float,
    norm: str = "linf",
    lo: float = 0.0,
    hi: float = 1.0,
    active: Tensor | None = None,
) -> Tensor:
    """Launcher of the fused step; same contract as :func:`pgd_update_reference`."""
    _check_update(x, x_nat, grad, eps, step_size, norm, lo, hi, active)
    xr, nat, g = _rows(x), _rows(x_nat).to(x.dtype), _rows(grad)
    n, d = xr.shape
    out = torch.empty_like(xr)
    act = active.to(torch.int8).contiguous() if active is not None else xr  # dummy pointer when unused
    if n == 0:
        return out.view_as(x)
    if norm == "linf":
        block = _block(d, 1024)
        jit(_pgd_linf_kernel)[(n, cdiv(d, block))](
            xr,
            nat,
            g,
            act,
            out,
            d,
            float(eps),
            float(step_size),
            float(lo),
            float(hi),
            HAS_ACTIVE=active is not None,
            BLOCK=block,
        )
    else:
        block = _block(d, 2048)
        jit(_pgd_l2_kernel)[(n,)](
            xr,
            nat,
            g,
            act,
            out,
            d,
            float(eps),
            float(step_size),
            float(lo),
            float(hi),
            _TINY,
            HAS_ACTIVE=active is not None,
            BLOCK=block,
        )
    return out.view(x.shape)


def random_start_triton(
    x_nat: Tensor, *, eps: float, norm: str = "linf", lo: float = 0.0, hi: float = 1.0, seed: int
) -> Tensor:
    """Launcher of the seeded random start; same contract as :func:`random_start_reference`."""
    _check_start(x_nat, eps, norm, lo, hi)
    nat = _rows(x_nat)
    n, d = nat.shape
    if n * d + n >= 2**31:
        raise ValueError("random_start's Triton kernel counts Philox offsets in int32: split the batch")
    out = torch.empty_like(nat)
    if n:
        jit(_random_start_kernel)[(n,)](
            nat,
            out,
            d,
            float(eps),
            float(lo),
            float(hi),
            int(seed),
            n * d,
            _TINY,
            L2=norm == "l2",
            BLOCK=_block(d, 2048),
        )
    return out.view(x_nat.shape)


# ----------------------------------------------------------------------------------------------- dispatch
def pgd_update(
    x: Tensor,
    x_nat: Tensor,
    grad: Tensor,
    *,
    eps: float,
    step_size: float,
    norm: str = "linf",
    lo: float = 0.0,
    hi: float = 1.0,
    active: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """One PGD step, projection and range clamp; ``active[i] = False`` returns sample ``i`` unchanged."""
    impl = pgd_update_triton if resolve_backend(backend, x) == "triton" else pgd_update_reference
    return impl(x, x_nat, grad, eps=eps, step_size=step_size, norm=norm, lo=lo, hi=hi, active=active)


def random_start(
    x_nat: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    lo: float = 0.0,
    hi: float = 1.0,
    seed: int,
    backend: str = "auto",
) -> Tensor:
    """A seeded point drawn uniformly from the ``norm`` ball of radius ``eps`` around ``x_nat``, clamped."""
    impl = random_start_triton if resolve_backend(backend, x_nat) == "triton" else random_start_reference
    return impl(x_nat, eps=eps, norm=norm, lo=lo, hi=hi, seed=seed)

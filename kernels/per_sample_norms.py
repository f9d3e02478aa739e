"""Per-sample squared gradient norms of a matmul-shaped layer, without forming the per-sample gradients.

A Linear layer (or a convolution, on its unfolded input) gives sample ``n`` the weight gradient
``G_n = g_n^T a_n`` with ``a_n: (T, Da)`` the layer's input rows and ``g_n: (T, Dg)`` the gradients of its
output rows (``T`` positions: tokens, or output pixels of a convolution). Its squared Frobenius norm has two
exact forms:

* ghost norm (Goodfellow 2015; Li et al. 2022): ``||G_n||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)``, cost
  ``T^2 (Da + Dg)`` per sample: cheap when ``T`` is small;
* instantiation: form ``G_n`` tile by tile and sum its squares, cost ``T Da Dg``: cheap when ``T`` is large.

Mixed ghost clipping (Bu et al. 2022) picks the cheaper per layer. The Triton kernels fuse each form so
neither the ``(T, T)`` Gram matrices nor ``G_n`` ever reach memory; each program writes one partial sum,
and the partials are added in torch (deterministic, no atomics). The references are chunked torch matmuls.

>>> a, g = torch.randn(3, 5, 7), torch.randn(3, 5, 4)
>>> want = torch.einsum("ntj,nti->nij", a, g).square().sum((1, 2))
>>> bool(torch.allclose(ghost_norm_sq(a, g), want, rtol=1e-4))
True
>>> bool(torch.allclose(instantiated_norm_sq(a, g), want, rtol=1e-4))
True
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import cdiv, jit, next_power_of_2, resolve_backend

tl = None  # bound to triton.language by dispatch.jit at the first launch (why: see dispatch.jit)

# The references process this many elements of the largest temporary at once, so a (T, T) Gram matrix or a
# (Dg, Da) per-sample gradient never costs more than ~32 MB of float32 however big the batch is.
_CHUNK_ELEMENTS = 1 << 23


def _validate(a: Tensor, g: Tensor) -> None:
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(f"a and g must be (N, T, D) tensors, got {tuple(a.shape)} and {tuple(g.shape)}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a {tuple(a.shape)} and g {tuple(g.shape)} must agree on (N, T)")


# ----------------------------------------------------------------------------------------------- references
def ghost_norm_sq_reference(a: Tensor, g: Tensor) -> Tensor:
    """``sum_{t,s} (a_t . a_s)(g_t . g_s)`` per sample, in float32: shape ``(N,)``."""
    _validate(a, g)
    n, t = a.shape[:2]
    a, g = a.float(), g.float()
    if t == 1:  # one position: the Gram matrices are scalars
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    step = _step(n, t * t)
    for lo in range(0, n, step):
        ac, gc = a[lo : lo + step], g[lo : lo + step]
        gram = torch.bmm(ac, ac.transpose(1, 2)).mul_(torch.bmm(gc, gc.transpose(1, 2)))
        out[lo : lo + ac.shape[0]] = gram.sum((1, 2))
    return out


def instantiated_norm_sq_reference(a: Tensor, g: Tensor) -> Tensor:
    """``||g_n^T a_n||_F^2`` per sample, in float32: shape ``(N,)``."""
    _validate(a, g)
    n, _, da = a.shape
    dg = g.shape[2]
    a, g = a.float(), g.float()
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    step = _step(n, da * dg)
    for lo in range(0, n, step):
        grad = torch.bmm(g[lo : lo + step].transpose(1, 2), a[lo : lo + step])
        out[lo : lo + grad.shape[0]] = grad.square().sum((1, 2))
    return out


def _step(n: int, per_sample: int) -> int:
    return max(1, min(n, _CHUNK_ELEMENTS // max(1, per_sample)))


# ----------------------------------------------------------------------------------------------- kernels
def _ghost_kernel(
    a_ptr,
    g_ptr,
    part_ptr,
    T,
    DA,
    DG,
    san,
    sat,
    sad,
    sgn,
    sgt,
    sgd,
    NTB,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (n, tb) owns row block tb of sample n's (T, T) Gram pair and sweeps the column blocks sb >= tb
    # (the product of two symmetric matrices summed: off-diagonal blocks count twice).
    n = tl.program_id(0)
    tb = tl.program_id(1)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    dcol = tl.arange(0, BLOCK_D)
    a_base = a_ptr + n.to(tl.int64) * san
    g_base = g_ptr + n.to(tl.int64) * sgn
    total = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float32), axis=0)  # a float32 scalar (loop-carried)
    for sb in range(tb, NTB):
        cols = sb * BLOCK_T + tl.arange(0, BLOCK_T)
        gram_a = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
        for d0 in range(0, DA, BLOCK_D):
            d = d0 + dcol
            x = tl.load(a_base + rows[:, None] * sat + d[None, :] * sad, (rows[:, None] < T) & (d[None, :] < DA), 0.0)
            y = tl.load(a_base + cols[:, None] * sat + d[None, :] * sad, (cols[:, None] < T) & (d[None, :] < DA), 0.0)
            gram_a += tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), input_precision="ieee")
        gram_g = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
        for d0 in range(0, DG, BLOCK_D):
            d = d0 + dcol
            x = tl.load(g_base + rows[:, None] * sgt + d[None, :] * sgd, (rows[:, None] < T) & (d[None, :] < DG), 0.0)
            y = tl.load(g_base + cols[:, None] * sgt + d[None, :] * sgd, (cols[:, None] < T) & (d[None, :] < DG), 0.0)
            gram_g += tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), input_precision="ieee")
        weight = 2.0 - (sb == tb).to(tl.float32)
        total += tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0) * weight
    tl.store(part_ptr + n * NTB + tb, total)


def _instantiate_kernel(
    a_ptr,
    g_ptr,
    part_ptr,
    T,
    DA,
    DG,
    san,
    sat,
    sad,
    sgn,
    sgt,
    sgd,
    NI,
    NJ,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # Program (n, i, j) forms tile (i, j) of G_n = g_n^T a_n by sweeping the positions, then squares and sums it.
    n = tl.program_id(0)
    i = tl.program_id(1)
    j = tl.program_id(2)
    gi = i * BLOCK_I + tl.arange(0, BLOCK_I)
    aj = j * BLOCK_J + tl.arange(0, BLOCK_J)
    tcol = tl.arange(0, BLOCK_T)
    a_base = a_ptr + n.to(tl.int64) * san
    g_base = g_ptr + n.to(tl.int64) * sgn
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tcol
        gt = tl.load(g_base + gi[:, None] * sgd + t[None, :] * sgt, (gi[:, None] < DG) & (t[None, :] < T), 0.0)
        at = tl.load(a_base + t[:, None] * sat + aj[None, :] * sad, (t[:, None] < T) & (aj[None, :] < DA), 0.0)
        acc += tl.dot(gt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
    tl.store(part_ptr + (n * NI + i) * NJ + j, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def _block(d: int, cap: int) -> int:
    return min(cap, next_power_of_2(max(d, 16)))  # tl.dot needs every block dimension >= 16


def ghost_norm_sq_triton(a: Tensor, g: Tensor) -> Tensor:
    """Launcher of the fused ghost norm; same contract as :func:`ghost_norm_sq_reference`."""
    _validate(a, g)
    n, t = a.shape[:2]
    block_t = _block(t, 64)
    ntb = cdiv(t, block_t)
    part = torch.zeros(n, ntb, dtype=torch.float32, device=a.device)
    if n and t:
        jit(_ghost_kernel)[(n, ntb)](
            a, g, part, t, a.shape[2], g.shape[2], *a.stride(), *g.stride(), ntb,
            BLOCK_T=block_t, BLOCK_D=32,
        )  # fmt: skip
    return part.sum(1)


def instantiated_norm_sq_triton(a: Tensor, g: Tensor) -> Tensor:
    """Launcher of the fused instantiated norm; same contract as :func:`instantiated_norm_sq_reference`."""
    _validate(a, g)
    n, t, da = a.shape
    dg = g.shape[2]
    block_i, block_j = _block(dg, 64), _block(da, 64)
    ni, nj = cdiv(dg, block_i), cdiv(da, block_j)
    part = torch.zeros(n, ni, nj, dtype=torch.float32, device=a.device)
    if n and t:
        jit(_instantiate_kernel)[(n, ni, nj)](
            a, g, part, t, da, dg, *a.stride(), *g.stride(), ni, nj,
            BLOCK_T=_block(t, 32), BLOCK_I=block_i, BLOCK_J=block_j,
        )  # fmt: skip
    return part.sum((1, 2))


# ----------------------------------------------------------------------------------------------- dispatch
def ghost_norm_sq(a: Tensor, g: Tensor, *, backend: str = "auto") -> Tensor:
    """Per-sample ``||g_n^T a_n||_F^2`` by the ghost-norm trick; ``a: (N, T, Da)``, ``g: (N, T, Dg)``, any strides."""
    impl = ghost_norm_sq_triton if resolve_backend(backend, a, g) == "triton" else ghost_norm_sq_reference
    return impl(a, g)


def instantiated_norm_sq(a: Tensor, g: Tensor, *, backend: str = "auto") -> Tensor:
    """Per-sample ``||g_n^T a_n||_F^2`` by forming ``g_n^T a_n`` tile by tile (never stored whole)."""
    impl = instantiated_norm_sq_triton if resolve_backend(backend, a, g) == "triton" else instantiated_norm_sq_reference
    return impl(a, g)

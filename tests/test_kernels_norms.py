"""The fused per-sample norm kernels equal their torch references (Triton's CPU interpreter here, CUDA on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from aisec_kernels import ghost_norm_sq, instantiated_norm_sq
from aisec_kernels import per_sample_norms as psn
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from aisec_train.train.bk_conv import unfold

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

IN_PROCESS = isinstance(triton.language.zeros, InterpretedFunction)
SHAPES = [(3, 5, 7, 4), (1, 1, 3, 5), (2, 70, 33, 17), (3, 17, 80, 65)]  # (N, T, Da, Dg): odd, past one block
LAYOUTS = ["contiguous", "transposed", "sliced"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if not IN_PROCESS:
        pytest.skip("triton was imported in compiled mode; test_interpreted_suite_in_subprocess covers this")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(shape, layout: str, dtype=torch.float32, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, Da) and (N, T, Dg) with the same values, as contiguous rows, as transposed (N, D, T) storage
    (how unfolded conv patches arrive), or as slices of bigger tensors."""
    n, t, da, dg = shape
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, t, da, generator=g).to(dtype), torch.randn(n, t, dg, generator=g).to(dtype)
    if layout == "transposed":
        a, b = a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":
        a = torch.zeros(n, t + 2, da + 3, dtype=dtype)[:, 1:-1, 2:-1].copy_(a)
        b = torch.zeros(n, t, dg + 1, dtype=dtype)[:, :, 1:].copy_(b)
    return a, b


def _definition(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ntj,nti->nij", a.double(), g.double()).square().sum((1, 2)).float()


def _rel(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    # Norms are sums of many products: compare relative to the largest, as a norm-clipping consumer would.
    scale = want.abs().max().clamp(min=1e-12)
    torch.testing.assert_close(got / scale, want / scale, **TOL[dtype])


# Every layout and dtype on the small shapes; the shapes that cross block edges once each (the interpreter is slow).
CASES = [(s, layout, dtype) for s in SHAPES[:2] for layout in LAYOUTS for dtype in (torch.float32, torch.bfloat16)]
CASES += [(SHAPES[2], "sliced", torch.float32), (SHAPES[3], "transposed", torch.float32)]


@pytest.mark.parametrize("shape,layout,dtype", CASES)
def test_triton_equals_reference(interpret, shape, layout, dtype):
    a, g = _inputs(shape, layout, dtype)
    if layout != "contiguous" and shape[1] > 1:
        assert not (a.is_contiguous() and g.is_contiguous())
    for triton_impl, reference in (
        (psn.ghost_norm_sq_triton, psn.ghost_norm_sq_reference),
        (psn.instantiated_norm_sq_triton, psn.instantiated_norm_sq_reference),
    ):
        got = triton_impl(a, g)
        assert got.dtype == torch.float32 and got.shape == (shape[0],)
        _rel(got, reference(a, g), dtype)
    assert torch.equal(ghost_norm_sq(a, g), psn.ghost_norm_sq_triton(a, g))  # dispatch picks Triton here
    assert torch.equal(instantiated_norm_sq(a, g), psn.instantiated_norm_sq_triton(a, g))


@pytest.mark.parametrize("shape", SHAPES)
def test_references_equal_the_definition(shape, monkeypatch):
    a, g = _inputs(shape, "transposed")
    want = _definition(a, g)
    _rel(psn.ghost_norm_sq_reference(a, g), want, torch.float32)
    _rel(psn.instantiated_norm_sq_reference(a, g), want, torch.float32)
    monkeypatch.setattr(psn, "_CHUNK_ELEMENTS", 7)  # one sample per chunk: chunking changes nothing
    _rel(psn.ghost_norm_sq_reference(a, g), want, torch.float32)
    _rel(psn.instantiated_norm_sq_reference(a, g), want, torch.float32)


def test_conv_case_on_unfolded_patches_equals_opacus_per_sample_gradients(interpret):
    """A strided, dilated, grouped Conv2d: the kernels on its unfolded patches give Opacus' per-sample norms."""
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2)
    x = torch.randn(3, 4, 9, 7)
    g = torch.randn_like(conv(x))
    want = compute_conv_grad_sample(conv, [x], g)[conv.weight].flatten(1).square().sum(1)
    n, groups, t = 3, 2, g[0, 0].numel()
    patches = unfold(conv, x, list(conv.padding)).view(n * groups, -1, t).transpose(1, 2)
    grads = g.reshape(n * groups, -1, t).transpose(1, 2)
    for impl in (psn.ghost_norm_sq_triton, psn.instantiated_norm_sq_triton):
        _rel(impl(patches, grads).view(n, groups).sum(1), want, torch.float32)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"must agree on \(N, T\)"):
        ghost_norm_sq(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match=r"\(N, T, D\) tensors"):
        instantiated_norm_sq(torch.zeros(2, 3), torch.zeros(2, 3))


def test_empty_batch(interpret):
    a, g = torch.zeros(0, 4, 3), torch.zeros(0, 4, 5)
    assert psn.ghost_norm_sq_triton(a, g).shape == (0,) and psn.instantiated_norm_sq_triton(a, g).shape == (0,)


def test_interpreted_suite_in_subprocess():
    if IN_PROCESS:
        pytest.skip("already ran in this process under the interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_cuda_equal_reference(dtype):
    for shape in SHAPES + [(64, 256, 1152, 128)]:
        a, g = (t.cuda() for t in _inputs(shape, "transposed", dtype))
        _rel(psn.ghost_norm_sq_triton(a, g).cpu(), psn.ghost_norm_sq_reference(a, g).cpu(), dtype)
        _rel(psn.instantiated_norm_sq_triton(a, g).cpu(), psn.instantiated_norm_sq_reference(a, g).cpu(), dtype)

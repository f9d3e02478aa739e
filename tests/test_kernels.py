"""Each Triton kernel equals its torch reference (Triton's CPU interpreter here, CUDA in the ``gpu`` test)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# triton was imported under its CPU interpreter by tests/conftest.py (see there); the `interpret` fixture
# turns the interpreter on per test. Where triton was already imported in compiled mode (a GPU machine), the
# interpreted tests run in a subprocess instead: test_interpreted_suite_in_subprocess.
from aisec_kernels import ChannelStats, channel_stats, pgd_update, random_start, resolve_backend
from aisec_kernels.channel_stats import channel_stats_reference, channel_stats_triton
from aisec_kernels.pgd_update import (
    pgd_update_reference,
    pgd_update_triton,
    random_start_reference,
    random_start_triton,
)
from scipy import stats

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

IN_PROCESS = isinstance(triton.language.zeros, InterpretedFunction)

SHAPE = (3, 5, 7, 9)  # odd sizes: no dimension is a multiple of a block
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if not IN_PROCESS:
        pytest.skip("triton was imported in compiled mode; test_interpreted_suite_in_subprocess covers this")
    # aisec_kernels builds its triton.jit objects at launch time, so setting the variable here is enough.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous tensor: a transposed view, or a slice of a bigger tensor."""
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":
        big = torch.zeros(t.shape[0], t.shape[1] + 2, *t.shape[2:], dtype=t.dtype)
        big[:, 1:-1] = t
        return big[:, 1:-1]
    return t


def _pgd_inputs(dtype: torch.dtype, layout: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(SHAPE, generator=g)
    x = (x_nat + 0.08 * torch.randn(SHAPE, generator=g)).clamp(0, 1)
    grad = torch.randn(SHAPE, generator=g)
    grad[0, 0, 0, :3] = 0.0  # sign(0) = 0 must agree too
    return tuple(_layout(t.to(dtype), layout) for t in (x, x_nat, grad))


# --------------------------------------------------------------------------------------------- pgd_update
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("masked", [False, True])
def test_pgd_update_triton_equals_reference(interpret, norm, dtype, layout, masked):
    x, x_nat, grad = _pgd_inputs(dtype, layout)
    if layout != "contiguous":
        assert not x.is_contiguous()
    active = torch.tensor([True, False, True]) if masked else None
    kw = dict(eps=0.1, step_size=0.03, norm=norm, active=active)
    got = pgd_update_triton(x, x_nat, grad, **kw)
    want = pgd_update_reference(x, x_nat, grad, **kw)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    if masked:
        assert torch.equal(got[1], x[1])  # an inactive sample is returned bit for bit
    assert torch.equal(pgd_update(x, x_nat, grad, **kw), got)  # dispatch under interpret mode picks Triton


def test_pgd_update_reference_matches_per_sample_formula():
    """The reference against the textbook, one sample at a time (torchattacks' PGD / PGDL2 op order)."""
    x, x_nat, grad = _pgd_inputs(torch.float32, "contiguous", seed=1)
    eps, alpha = 0.1, 0.2  # alpha > eps so the L2 projection binds
    got_inf = pgd_update_reference(x, x_nat, grad, eps=eps, step_size=alpha, norm="linf")
    got_l2 = pgd_update_reference(x, x_nat, grad, eps=eps, step_size=alpha, norm="l2")
    for i in range(x.shape[0]):
        step = x[i] + alpha * grad[i].sign()
        want = (x_nat[i] + (step - x_nat[i]).clamp(-eps, eps)).clamp(0, 1)
        torch.testing.assert_close(got_inf[i], want)
        delta = x[i] + alpha * grad[i] / (grad[i].norm() + 1e-10) - x_nat[i]
        delta = delta * min(1.0, eps / (delta.norm().item() + 1e-10))
        torch.testing.assert_close(got_l2[i], (x_nat[i] + delta).clamp(0, 1))


def test_pgd_update_rejects_bad_arguments():
    x, x_nat, grad = _pgd_inputs(torch.float32, "contiguous")
    with pytest.raises(ValueError, match="norm"):
        pgd_update(x, x_nat, grad, eps=0.1, step_size=0.1, norm="l1", backend="torch")
    with pytest.raises(ValueError, match="active"):
        pgd_update(x, x_nat, grad, eps=0.1, step_size=0.1, active=torch.ones(3), backend="torch")


# --------------------------------------------------------------------------------------------- random_start
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("impl", [random_start_triton, random_start_reference])
def test_random_start_seeded_and_inside_ball(interpret, norm, impl):
    _, x_nat, _ = _pgd_inputs(torch.float32, "sliced")
    eps = 0.1
    a = impl(x_nat, eps=eps, norm=norm, seed=7)
    assert torch.equal(a, impl(x_nat, eps=eps, norm=norm, seed=7))  # same seed, same start
    assert not torch.equal(a, impl(x_nat, eps=eps, norm=norm, seed=8))
    assert a.min() >= 0 and a.max() <= 1
    delta = (a - x_nat).flatten(1)
    dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (dist <= eps + 1e-6).all()
    assert (dist > 0).all()


def test_random_start_linf_is_uniform(interpret):
    """Unclamped Linf noise from both implementations follows U(-eps, eps) (Kolmogorov-Smirnov)."""
    x_nat = torch.zeros(64, 1, 5, 5)
    eps = 0.3
    for impl in (random_start_triton, random_start_reference):
        noise = impl(x_nat, eps=eps, lo=-1.0, hi=1.0, seed=3).flatten().numpy()
        assert stats.kstest(noise, stats.uniform(loc=-eps, scale=2 * eps).cdf).pvalue > 1e-3


def test_random_start_l2_is_uniform_in_ball(interpret):
    """Radii follow P(r <= s) = (s / eps)^d and directions are isotropic, for both implementations (d = 3)."""
    x_nat = torch.zeros(400, 1, 1, 3)
    eps, d = 0.5, 3
    for impl in (random_start_triton, random_start_reference):
        noise = impl(x_nat, eps=eps, norm="l2", lo=-1.0, hi=1.0, seed=5).flatten(1)
        radii = noise.norm(dim=1).numpy()
        assert stats.kstest(radii, lambda s: (s / eps) ** d).pvalue > 1e-3
        directions = noise / noise.norm(dim=1, keepdim=True)
        assert directions.mean(0).abs().max() < 0.15  # ~ 3 standard errors of 1/sqrt(3 * 400)


# --------------------------------------------------------------------------------------------- channel_stats
def _assert_stats_close(got: ChannelStats, want: ChannelStats) -> None:
    assert got.count == want.count
    torch.testing.assert_close(got.sum, want.sum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.sum_sq, want.sum_sq, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.count_positive, want.count_positive)
    assert torch.equal(got.max, want.max)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_channel_stats_triton_equals_reference(interpret, dtype, layout):
    feat = _layout(torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).to(dtype), layout)
    got = channel_stats_triton(feat)
    assert got.sum.dtype == torch.float32  # accumulated in float32 whatever the input dtype
    _assert_stats_close(got, channel_stats_reference(feat))
    f = feat.float()
    torch.testing.assert_close(got.mean, f.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.mean_sq, (f * f).mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.frac_positive, (f > 0).float().mean(dim=(0, 2, 3)))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_channel_stats_accumulates_across_batches(interpret, backend):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 5, 7, 9, generator=g), torch.randn(6, 5, 7, 9, generator=g) + 0.5
    state = channel_stats(a, backend=backend)
    state = channel_stats(b, state, backend=backend)
    _assert_stats_close(state, channel_stats_reference(torch.cat([a, b])))


def test_channel_stats_rejects_non_4d():
    with pytest.raises(ValueError, match="N, C, H, W"):
        channel_stats(torch.zeros(3, 4), backend="torch")


# --------------------------------------------------------------------------------------------- dispatch
def test_resolve_backend(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="CPU tensors"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="choose"):
        resolve_backend("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == "triton"
    assert resolve_backend("triton", cpu) == "triton"


def test_interpreted_suite_in_subprocess():
    if IN_PROCESS:
        pytest.skip("the interpreted tests ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "1 skipped" in summary, done.stdout[-2000:]  # only this test skips there


# --------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_cuda_equal_reference(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels, not the interpreter
    x, x_nat, grad = (t.cuda() for t in _pgd_inputs(dtype, "transposed"))
    active = torch.tensor([True, False, True], device="cuda")
    assert resolve_backend("auto", x) == "triton"
    for norm in ("linf", "l2"):
        kw = dict(eps=0.1, step_size=0.03, norm=norm, active=active)
        got = pgd_update(x, x_nat, grad, **kw, backend="triton")
        torch.testing.assert_close(got.float(), pgd_update_reference(x, x_nat, grad, **kw).float(), **TOL[dtype])
        start = random_start(x_nat, eps=0.1, norm=norm, seed=1, backend="triton")
        assert torch.equal(start, random_start(x_nat, eps=0.1, norm=norm, seed=1, backend="triton"))
        delta = (start.float() - x_nat.float()).flatten(1)
        dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (dist <= 0.1 * 1.02 + 1e-6).all()  # bf16 rounding can step just past the sphere
    big = torch.randn(64, 96, 17, 17, device="cuda").to(dtype)[:, ::2]  # non-contiguous, 48 channels
    _assert_stats_close(channel_stats(big, backend="triton"), channel_stats_reference(big))

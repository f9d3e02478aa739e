"""Edge cases of the kernels: bad arguments are refused before any launch (the Triton launchers used to read past
a smaller x_nat or grad and to step outside the ball for a negative or NaN eps), and on edge shapes the Triton
kernel (Triton's CPU interpreter here) equals its torch reference and stays in the eps-ball and [lo, hi]."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from aisec_kernels.pgd_update import (
    pgd_update_reference,
    pgd_update_triton,
    random_start_reference,
    random_start_triton,
)

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

IN_PROCESS = isinstance(triton.language.zeros, InterpretedFunction)
UPDATES = [pgd_update_reference, pgd_update_triton]
STARTS = [random_start_reference, random_start_triton]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if not IN_PROCESS:
        pytest.skip("triton was imported in compiled mode; test_interpreted_edges_in_subprocess covers this")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(shape=(3, 1, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g)
    return (x_nat + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1), x_nat, torch.randn(shape, generator=g)


@pytest.mark.parametrize("impl", UPDATES)
@pytest.mark.parametrize(
    ("which", "bad"),
    [
        ("x_nat", lambda t: t[:1]),  # broadcastable: the launcher read rows 1.. past x_nat's buffer
        ("grad", lambda t: t[..., :4]),  # same batch, fewer values per row: read past grad's rows
        ("grad", lambda t: t.reshape(t.shape[0], -1)[:, :20]),
    ],
)
def test_pgd_update_refuses_tensors_of_another_shape(interpret, impl, which, bad):
    x, x_nat, grad = _inputs()
    args = {"x": x, "x_nat": x_nat, "grad": grad}
    args[which] = bad(args[which])
    with pytest.raises(ValueError, match=f"{which} .* must match x"):
        impl(args["x"], args["x_nat"], args["grad"], eps=0.1, step_size=0.03)


@pytest.mark.parametrize("impl", UPDATES)
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"eps": -0.1}, r"eps=-0.1: must be a finite number >= 0"),
        ({"eps": float("nan")}, r"eps=nan: must be a finite number >= 0"),
        ({"eps": float("inf")}, r"eps=inf: must be a finite number >= 0"),
        ({"step_size": float("nan")}, r"step_size=nan: must be a finite number >= 0"),
        ({"step_size": -0.01}, r"step_size=-0.01: must be a finite number >= 0"),
        ({"lo": 1.0, "hi": 0.0}, r"lo=1.0 > hi=0.0"),
        ({"hi": float("nan")}, r"hi=nan: must be a finite number"),
    ],
)
def test_pgd_update_refuses_bad_numbers(interpret, impl, kw, message):
    x, x_nat, grad = _inputs()
    with pytest.raises(ValueError, match=message):
        impl(x, x_nat, grad, **({"eps": 0.1, "step_size": 0.03} | kw))


@pytest.mark.parametrize("impl", UPDATES)
def test_pgd_update_refuses_integer_images_and_scalars(interpret, impl):
    x, x_nat, grad = _inputs()
    with pytest.raises(ValueError, match="x must be a floating-point"):
        impl((x * 255).to(torch.uint8), x_nat, grad, eps=0.1, step_size=0.03)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        impl(x[0, 0, 0, 0], x_nat[0, 0, 0, 0], grad[0, 0, 0, 0], eps=0.1, step_size=0.03)


@pytest.mark.parametrize("impl", STARTS)
@pytest.mark.parametrize("eps", [-0.1, float("nan")])
def test_random_start_refuses_bad_eps_and_integer_images(interpret, impl, eps):
    _, x_nat, _ = _inputs()
    with pytest.raises(ValueError, match="eps=.*must be a finite number >= 0"):
        impl(x_nat, eps=eps, seed=0)
    with pytest.raises(ValueError, match="x_nat must be a floating-point"):
        impl((x_nat * 255).to(torch.uint8), eps=0.1, seed=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize(
    ("shape", "dtype", "eps", "layout"),
    [
        ((1, 1, 1, 1), torch.float32, 0.1, "contiguous"),  # batch 1, one value
        ((1, 3, 5, 7), torch.float64, 0.0, "transposed"),  # eps = 0: the step must not move x off x_nat
        ((2, 3, 17, 3), torch.float32, 8 / 255, "transposed"),
        ((1, 2, 33, 65), torch.float32, 0.5, "contiguous"),  # a row longer than one Linf block
    ],
)
def test_pgd_update_edges_agree_and_stay_in_the_ball(interpret, norm, shape, dtype, eps, layout):
    x, x_nat, grad = (t.to(dtype) for t in _inputs(shape))
    if layout == "transposed":
        x, x_nat, grad = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x, x_nat, grad))
    kw = dict(eps=eps, step_size=0.2, norm=norm)  # a step larger than eps: the projection binds
    got, want = pgd_update_triton(x, x_nat, grad, **kw), pgd_update_reference(x, x_nat, grad, **kw)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    delta = (got - x_nat).flatten(1).double()
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps + 1e-6).all()) and bool(((got >= 0) & (got <= 1)).all())


def test_interpreted_edges_in_subprocess():
    """Where triton was imported in compiled mode (a GPU machine), the interpreted edge cases run in a subprocess."""
    if IN_PROCESS:
        pytest.skip("the interpreted edge cases ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary, summary  # the subprocess ran them interpreted

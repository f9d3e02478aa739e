"""privacy/noise.py: Opacus' secure-mode noise drawn per group of tensors, the same mechanism with fewer ops."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.ddpoptimizer_fast_gradient_clipping import DistributedDPOptimizerFastGradientClipping
from scipy import stats
from torch import nn

from aisec_train.privacy import noise as flat_noise
from aisec_train.privacy.noise import flat_secure_noise


def _optimizer(params, cls=DPOptimizerFastGradientClipping, seed=7, multiplier=2.0, clip=0.5):
    optimizer = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=multiplier, max_grad_norm=clip,
                    expected_batch_size=1, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    _sums(params)  # after the constructor, which sets every summed_grad to None
    return optimizer


def _params(*shapes):
    return [nn.Parameter(torch.zeros(s)) for s in shapes]


def _sums(params, zero=False):
    for i, p in enumerate(params):
        p.summed_grad = torch.zeros(p.shape) if zero else torch.full(p.shape, float(i + 1))


@pytest.mark.parametrize("cls", [DPOptimizer, DPOptimizerFastGradientClipping])
def test_each_coordinate_gets_half_the_sum_of_four_draws_from_the_optimizers_generator(cls, monkeypatch):
    """The draw, replayed by hand: one discarded value per step, then per group four draws of its whole length."""
    monkeypatch.setattr(flat_noise, "_GROUP_FLOATS", 10)  # groups: (3, 4), (20,), (2,)
    params = _params((3,), (2, 2), (20,), (2,))
    optimizer = _optimizer(params, cls)
    optimizer.secure_mode = True
    assert flat_secure_noise(optimizer)
    optimizer.add_noise()
    g, std = torch.Generator().manual_seed(7), 2.0 * 0.5
    torch.normal(0.0, std, size=(1, 1), generator=g)
    expected = []
    for group in ([0, 1], [2], [3]):
        n = sum(params[i].numel() for i in group)
        draws = sum(torch.empty(n).normal_(0.0, std, generator=g) for _ in range(4)) / 2
        expected.append(torch.cat([params[i].summed_grad.flatten() for i in group]) + draws)
    got = torch.cat([p.grad.flatten() for p in params])
    assert torch.allclose(got, torch.cat(expected), atol=1e-6, rtol=0)
    assert [p.grad.shape for p in params] == [p.shape for p in params]


def test_the_noise_is_gaussian_with_opacus_std_and_fresh_every_step():
    params = _params((40_000,), (17,), (3, 3))
    optimizer = _optimizer(params)
    _sums(params, zero=True)
    optimizer.secure_mode = True
    assert flat_secure_noise(optimizer)
    optimizer.add_noise()
    first = torch.cat([p.grad.flatten() for p in params])
    assert stats.kstest(first.double().numpy(), "norm", args=(0.0, 1.0)).pvalue > 1e-3  # std = 2.0 * 0.5
    _sums(params, zero=True)
    optimizer.add_noise()
    second = torch.cat([p.grad.flatten() for p in params])
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.05


def test_without_secure_mode_it_draws_once_and_with_std_zero_it_adds_nothing():
    params = _params((5,), (4,))
    optimizer = _optimizer(params, seed=3)
    assert flat_secure_noise(optimizer)  # secure_mode is off by default in Opacus
    optimizer.add_noise()
    draws = torch.empty(9).normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(torch.cat([p.grad for p in params]), torch.cat([p.summed_grad for p in params]) + draws)
    quiet = _params((5,))
    zero = _optimizer(quiet, multiplier=0.0)
    zero.secure_mode = True
    assert flat_secure_noise(zero)
    zero.add_noise()
    assert torch.equal(quiet[0].grad, quiet[0].summed_grad) and quiet[0].grad is not quiet[0].summed_grad


def test_an_optimizer_that_overrides_add_noise_keeps_its_own():
    """The data-parallel optimizers add the noise on rank 0 only: their add_noise is left alone."""
    params = _params((3,))
    optimizer = DistributedDPOptimizerFastGradientClipping.__new__(DistributedDPOptimizerFastGradientClipping)
    assert not flat_secure_noise(optimizer)
    assert "add_noise" not in vars(optimizer)
    assert flat_secure_noise(_optimizer(params))


def test_a_private_run_of_the_engine_uses_it(tmp_path):
    """Every optimizer BKPrivacyEngine makes (bk, and its ghost and hooks modes) draws per group."""
    from aisec_train.train.bk_engine import BKPrivacyEngine

    for mode in ("bk", "ghost", "hooks"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4), torch.zeros(8).long()),
                                             batch_size=4)  # fmt: skip
        wrapped = BKPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, criterion=nn.CrossEntropyLoss(),
        )  # fmt: skip
        optimizer = wrapped[1]
        assert "add_noise" in vars(optimizer), mode
        assert optimizer.add_noise.__qualname__.startswith("flat_secure_noise"), mode


def test_bk_and_ghost_accumulate_a_copy_of_each_clipped_sum_as_opacus_does():
    """bk_engine's ``accumulate`` clones where Opacus deepcopies: the same copy, summed over several backwards."""
    from aisec_train.train.bk_engine import _accumulate_by_clone

    params = _params((3,), (2, 2))
    optimizer = _optimizer(params)
    for p in params:
        p.summed_grad = None
    _accumulate_by_clone(optimizer)
    assert "accumulate" in vars(optimizer)
    first = [torch.randn(p.shape) for p in params]
    for p, g in zip(params, first, strict=True):
        p.grad = g.clone()
    optimizer.accumulate()
    pairs = list(zip(params, first, strict=True))
    assert all(p.summed_grad is not p.grad and torch.equal(p.summed_grad, g) for p, g in pairs)
    for p in params:
        p.grad.mul_(0).add_(1)  # the next backward's gradient, written in place: the copy must not follow it
    optimizer.accumulate()
    assert all(torch.equal(p.summed_grad, g + 1) for p, g in zip(params, first, strict=True))
    hooks = _optimizer(_params((3,)), DPOptimizer)
    _accumulate_by_clone(hooks)  # hooks' optimizer clips rows into summed_grad itself: left alone
    assert "accumulate" not in vars(hooks)

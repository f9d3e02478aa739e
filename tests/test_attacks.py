"""FGSM / PGD against torchattacks on a small CNN trained on scikit-learn's digits, and on Opacus-wrapped
models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aisec_train.robust import attack_mode, fgsm, make_adversary, pgd, robust_accuracy
from tests.conftest import accuracy, distance

torchattacks = pytest.importorskip("torchattacks")

EPS, ALPHA, STEPS = 0.1, 0.025, 10  # on digits (x / 16) this leaves robust accuracy well between 0 and clean


@pytest.fixture(scope="module")
def digits(digits_cnn) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The digits CNN of conftest.py (trained for a few seconds with plain Adam) and its 397 held-out digits."""
    return digits_cnn


def test_pgd_at_least_as_strong_as_torchattacks(digits):
    """Same eps, step, steps and random-start distribution, over three starts: never > 0.5 points weaker."""
    model, x, y = digits
    clean = accuracy(model, x, y)
    theirs, ours = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        theirs.append(accuracy(model, torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS)(x, y), y))
        x_adv = pgd(model, x, y, eps=EPS, step_size=ALPHA, steps=STEPS, seed=seed, early_stop=True)
        ours.append(accuracy(model, x_adv, y))
    assert 0.05 < min(theirs) and max(theirs) < clean - 0.3  # the comparison is not trivial
    assert sum(ours) / 3 <= sum(theirs) / 3 + 0.005
    # robust_accuracy on one batch is that attack with seed 0
    assert robust_accuracy(model, x, y, norm="linf", eps=EPS, step_size=ALPHA, steps=STEPS) == pytest.approx(ours[0])


def test_pgd_l2_equals_torchattacks_without_random_start(digits):
    """Same arithmetic as torchattacks' PGDL2; their random start (radius ~ U(0, eps)) differs from ours
    (uniform in the ball), so the deterministic variant is compared."""
    model, x, y = digits
    theirs = torchattacks.PGDL2(model, eps=0.6, alpha=0.15, steps=STEPS, random_start=False)(x, y)
    ours = pgd(model, x, y, norm="l2", eps=0.6, step_size=0.15, steps=STEPS, random_start=False)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)  # they average the loss, we sum it: rounding
    assert accuracy(model, ours, y) < accuracy(model, x, y) - 0.3


def test_fgsm_equals_torchattacks(digits):
    model, x, y = digits
    torch.testing.assert_close(fgsm(model, x, y, eps=EPS), torchattacks.FGSM(model, eps=EPS)(x, y))


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.6)])
def test_adversarial_inputs_in_ball_and_range(digits, norm, eps):
    model, x, y = digits
    for x_adv in (
        pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5, norm=norm, restarts=2, early_stop=True),
        fgsm(model, x, y, eps=eps, norm=norm),
    ):
        assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (distance(x_adv, x, norm) <= eps + 1e-5).all()


def test_restarts_never_weaker(digits):
    model, x, y = digits
    one = robust_accuracy(model, x, y, eps=EPS, step_size=ALPHA, steps=5, restarts=1)
    four = robust_accuracy(model, x, y, eps=EPS, step_size=ALPHA, steps=5, restarts=4)
    assert four <= one


def test_early_stop_freezes_misclassified_samples(digits):
    model, x, y = digits
    wrong = model(x).argmax(1) != y
    assert wrong.any()
    x_adv = pgd(model, x, y, eps=EPS, step_size=ALPHA, steps=3, random_start=False, early_stop=True)
    assert torch.equal(x_adv[wrong], x[wrong])
    assert not torch.equal(x_adv[~wrong], x[~wrong])


def test_targeted_pgd_reaches_target(digits):
    model, x, y = digits
    target = (y + 1) % 10
    x_adv = pgd(model, x, target, eps=0.2, step_size=0.05, steps=STEPS, targeted=True)
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == target).float().mean().item()
    assert hit > 0.5


def test_attack_leaves_model_untouched(digits):
    model, x, y = digits
    model.train()
    before = copy.deepcopy(model.state_dict())
    pgd(model, x[:64], y[:64], eps=EPS, step_size=ALPHA, steps=3, restarts=2)
    fgsm(model, x[:64], y[:64], eps=EPS)
    assert model.training  # mode restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_autocast_ignored_on_cpu(digits):
    model, x, y = digits
    kw = dict(eps=EPS, step_size=ALPHA, steps=3)
    assert torch.equal(pgd(model, x, y, **kw, autocast_bf16=True), pgd(model, x, y, **kw))


@pytest.mark.parametrize("mode", ["pgd_at", "fgsm_rs"])
def test_make_adversary(digits, mode):
    model, x, y = digits
    adversary = make_adversary(mode, eps=EPS, steps=3)
    x_adv = adversary(model, x, y)
    assert (distance(x_adv, x, "linf") <= EPS + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.1
    assert not torch.equal(adversary(model, x, y), x_adv)  # a fresh random start per batch
    assert make_adversary("none", eps=EPS) is None
    with pytest.raises(ValueError, match="unknown"):
        make_adversary("trades", eps=EPS)


# --------------------------------------------------------------------------------------------- Opacus
def _dp_steps(base: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, attack: bool) -> list[torch.Tensor]:
    """Two DP-SGD steps (noise 0, so the result is deterministic), with or without PGD runs in between."""
    from opacus import PrivacyEngine

    model = copy.deepcopy(base).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    kw = dict(noise_multiplier=0.0, max_grad_norm=0.1, poisson_sampling=False, grad_sample_mode=mode)
    criterion = nn.CrossEntropyLoss()
    engine = PrivacyEngine()
    if mode == "ghost":
        model, optimizer, criterion, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, **kw
        )
    else:
        model, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, **kw)
    attack_kw = dict(eps=EPS, step_size=ALPHA, steps=2, restarts=2)
    for i in range(2):
        xb, yb = x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)]
        optimizer.zero_grad()
        if attack:
            pgd(model, x[:16], y[:16], **attack_kw)  # before the forward
        loss = criterion(model(xb), yb)
        if attack:
            pgd(model, x[16:40], y[16:40], **attack_kw)  # between forward and backward
        loss.backward()
        if attack:
            fgsm(model, x[:8], y[:8], eps=EPS)  # between backward and the DP step
            assert model.training and model.hooks_enabled
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_attack_does_not_disturb_opacus(digits, mode):
    model, x, y = digits
    plain = _dp_steps(model, x, y, mode, attack=False)
    attacked = _dp_steps(model, x, y, mode, attack=True)
    assert any(not torch.equal(p, q) for p, q in zip(plain, model.parameters(), strict=True))  # a real step
    for p, q in zip(plain, attacked, strict=True):
        assert torch.equal(p, q)


def test_attack_mode_restores_on_error(digits):
    model, x, _ = digits
    model.train()
    with pytest.raises(RuntimeError), attack_mode(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()

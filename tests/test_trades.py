"""TRADES: the loss against the reference formula, the KL-PGD inner loop against the reference loop, robustness
gained by a short training run on digits, and per-sample gradients under Opacus DP-SGD (hooks mode)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from aisec_train.errors import ConfigError
from aisec_train.models import build_model
from aisec_train.robust.adversary import robust_accuracy
from aisec_train.robust.config import RobustMode, RobustnessConfig
from aisec_train.robust.trades import Trades, trades_loss, trades_perturb

EPS, STEP, STEPS = 0.1, 0.025, 5


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None], torch.tensor(data.target)


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=1, num_classes=10, image_size=8)


def _reference_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, beta: float):
    """yaodongyu/TRADES trades.py, the outer loss: KLDivLoss(size_average=False) / batch_size."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x)) * criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
    return loss_natural + beta * loss_robust


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def test_beta_zero_is_cross_entropy_on_clean_inputs(digits):
    x, y = digits[0][:33], digits[1][:33]
    model = _cnn()
    x_adv = trades_perturb(model, x, eps=EPS, step_size=STEP, steps=STEPS, seed=0)
    loss, logits = trades_loss(model, x, x_adv, y, beta=0.0)
    reference = F.cross_entropy(model(x), y)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(logits, model(x))
    for got, want in zip(_grads(model, loss), _grads(model, reference), strict=True):
        torch.testing.assert_close(got, want)


def test_loss_and_gradient_equal_the_reference_implementation(digits):
    x, y = digits[0][:33], digits[1][:33]
    model = _cnn()
    x_adv = trades_perturb(model, x, eps=EPS, step_size=STEP, steps=STEPS, seed=0)
    loss, _ = trades_loss(model, x, x_adv, y, beta=6.0)
    reference = _reference_loss(model, x, x_adv, y, beta=6.0)
    torch.testing.assert_close(loss, reference)
    for got, want in zip(_grads(model, loss), _grads(model, reference), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert loss > F.cross_entropy(model(x), y)  # the KL term is live


def test_inner_maximisation_equals_the_reference_loop(digits):
    """From the same start, our KL-PGD (fused update kernel) equals the reference's eager Linf loop."""
    x = digits[0][:33]
    model = _cnn().eval()
    start = (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    x_ref = start.clone()
    for _ in range(STEPS):
        x_ref.requires_grad_()
        loss_kl = criterion_kl(F.log_softmax(model(x_ref), dim=1), F.softmax(model(x), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_ref])[0]
        x_ref = x_ref.detach() + STEP * torch.sign(grad.detach())
        x_ref = torch.clamp(torch.min(torch.max(x_ref, x - EPS), x + EPS), 0.0, 1.0)
    ours = trades_perturb(model, x, eps=EPS, step_size=STEP, steps=STEPS, x_init=start, backend="torch")
    torch.testing.assert_close(ours, x_ref, atol=1e-6, rtol=0)
    assert (ours - x).abs().max() > EPS / 2  # it moved


def test_objective_matches_the_loop_protocol_and_config(digits):
    x, y = digits[0][:17], digits[1][:17]
    cfg = RobustnessConfig(mode=RobustMode.trades, beta=3.0)
    cfg.resolve("digits")
    objective = Trades.from_config(cfg)
    assert (objective.name, objective.forwards) == ("trades", 2)
    assert (objective.eps, objective.step_size, objective.steps, objective.beta) == (0.1, cfg.step_size, 7, 3.0)
    model = _cnn()
    torch.manual_seed(5)
    loss, logits = objective(model, model, x, y, nn.CrossEntropyLoss())
    assert model.training and logits.shape == (17, 10) and loss.requires_grad
    with pytest.raises(ConfigError, match="robustness.beta=-1.0 is not allowed"):
        Trades(eps=0.1, step_size=0.02, beta=-1.0)


def test_trades_training_raises_pgd_robust_accuracy(digits):
    """Six epochs of plain training vs TRADES (beta 6, KL-PGD-5) on digits, same seed and schedule."""
    x, y = digits
    x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]
    trades = Trades(eps=EPS, step_size=STEP, steps=STEPS, beta=6.0)
    robust = {}
    for name in ("plain", "trades"):
        model = _cnn()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            perm = torch.randperm(1400, generator=gen)
            for i in range(0, 1400, 100):
                xb, yb = x_tr[perm[i : i + 100]], y_tr[perm[i : i + 100]]
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb) if name == "plain" else trades(model, model, xb, yb)[0]
                loss.backward()
                opt.step()
        model.eval()
        robust[name] = robust_accuracy(model, x_te, y_te, eps=EPS, step_size=2.5 * EPS / 10, steps=10)
    assert robust["trades"] > robust["plain"] + 0.15, robust


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_per_sample_gradients_under_opacus_hooks_equal_a_per_sample_loop():
    """Opacus' hooks mode accumulates each record's clean and adversarial contributions: grad_sample[i] is the
    gradient of record i's own TRADES loss (batch of 3), and the attack leaves no per-sample state behind."""
    torch.manual_seed(0)
    plain = _Tiny()
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 2, 1])
    objective = Trades(eps=0.2, step_size=0.05, steps=3, beta=6.0)
    x_adv = objective.perturb(plain, x, y)
    reference = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(plain, batch_first=True, loss_reduction="mean")
    objective.perturb(wrapped, x, y)  # attack mode: hooks off, so nothing recorded
    assert all(not getattr(m, "activations", None) for m in wrapped.modules())
    assert all(p.grad_sample is None for p in wrapped.parameters())
    loss, _ = objective.loss(wrapped, x, x_adv, y)
    loss.backward()
    for i in range(3):
        own, _ = trades_loss(reference, x[i : i + 1], x_adv[i : i + 1], y[i : i + 1], beta=6.0)
        for p, g in zip(wrapped.parameters(), _grads(reference, own), strict=True):
            torch.testing.assert_close(p.grad_sample[i], g, atol=1e-6, rtol=1e-5)


def test_dp_step_clips_the_summed_per_sample_gradient():
    """Through Opacus' PrivacyEngine (hooks, no noise): the step's gradient is the mean of each record's clipped
    TRADES gradient, clipped as one vector (clean + adversarial), not per forward pass."""
    torch.manual_seed(0)
    model = _Tiny()
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 2, 1])
    objective = Trades(eps=0.2, step_size=0.05, steps=3, beta=6.0)
    x_adv = objective.perturb(model, x, y)
    reference = copy.deepcopy(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=0.05,
            poisson_sampling=False,
            grad_sample_mode="hooks",
        )
    loss, _ = objective.loss(private, x, x_adv, y)
    loss.backward()
    opt.pre_step()  # clip and aggregate (noise 0): p.grad is the privatised gradient
    clipped = []
    for i in range(3):
        own, _ = trades_loss(reference, x[i : i + 1], x_adv[i : i + 1], y[i : i + 1], beta=6.0)
        g = _grads(reference, own)
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        clipped.append([t * min(1.0, 0.05 / (float(norm) + 1e-6)) for t in g])
    for j, p in enumerate(private.parameters()):
        torch.testing.assert_close(p.grad, sum(c[j] for c in clipped) / 3, atol=1e-7, rtol=1e-4)


def test_book_keeping_clips_the_summed_per_sample_gradient():
    """The project's book-keeping engine (grad_sample_mode=bk, allowed with TRADES) sees both forward passes:
    its per-sample norms are those of each record's whole TRADES gradient, and p.grad is the clipped sum."""
    from aisec_train.train.bk import BKGradSampleModule

    torch.manual_seed(0)
    model = _Tiny()
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 2, 1])
    objective = Trades(eps=0.2, step_size=0.05, steps=3, beta=6.0)
    x_adv = objective.perturb(model, x, y)
    reference = copy.deepcopy(model)
    wrapped = BKGradSampleModule(model, max_grad_norm=0.05)
    loss, _ = objective.loss(wrapped, x, x_adv, y)
    loss.backward()
    norms, clipped = [], []
    for i in range(3):
        own, _ = trades_loss(reference, x[i : i + 1], x_adv[i : i + 1], y[i : i + 1], beta=6.0)
        g = _grads(reference, own)
        norms.append(torch.sqrt(sum((t**2).sum() for t in g)))
        clipped.append([t * min(1.0, 0.05 / (float(norms[-1]) + 1e-6)) for t in g])
    torch.testing.assert_close(wrapped.per_sample_gradient_norms, torch.stack(norms), atol=1e-6, rtol=1e-5)
    for j, p in enumerate(wrapped.parameters()):
        torch.testing.assert_close(p.grad, sum(c[j] for c in clipped), atol=1e-7, rtol=1e-4)


def test_ghost_clipping_is_refused():
    torch.manual_seed(0)
    model = _Tiny()
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 2, 1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, _, criterion, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="ghost",
        )
    with pytest.raises(ConfigError, match="privacy.grad_sample_mode='ghost' is not allowed with robustness=trades"):
        Trades(eps=0.2, step_size=0.05, steps=2)(private, private, x, y, criterion)


try:  # tests/conftest.py imported triton under its CPU interpreter where there is no GPU
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    IN_PROCESS = isinstance(triton.language.zeros, InterpretedFunction)
except ImportError:
    IN_PROCESS = False


@pytest.mark.skipif(not IN_PROCESS, reason="needs triton imported under its CPU interpreter (tests/conftest.py)")
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_triton_path_equals_torch_path(digits, monkeypatch, norm):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = digits[0][:5]
    model = _cnn().eval()
    eps = EPS if norm == "linf" else 0.5
    kw = dict(eps=eps, step_size=eps / 4, steps=3, norm=norm, seed=4)
    torch.testing.assert_close(
        trades_perturb(model, x, backend="triton", **kw),
        trades_perturb(model, x, backend="torch", **kw),
        atol=1e-5,
        rtol=0,
    )

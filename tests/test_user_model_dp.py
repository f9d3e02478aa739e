"""Users' models with structure the DP step may not expect: each record's clipped contribution is at most C, or the
model is refused in one line before any step.

The measure (noise 0, C small enough that every record is clipped): the sum of clipped per-sample gradients that
the private optimizer would noise, with and without record j; their difference is j's contribution, which must
have norm <= C and equal j's own gradient (one backward on j alone) scaled to C. A parameter used outside its
layer's forward (a tied head ``F.linear(h, emb.weight)``) gave book-keeping 500 C and ghost mode 2 C for one
record; a buffer updated from the batch moved the other records by 1.04 C. Both are now refused (train/bk_uses.py,
train/bk.py), in every ``privacy.grad_sample_mode``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aisec_train
from aisec_train.errors import ConfigError
from aisec_train.privacy.ledger_store import LedgerStore
from aisec_train.train.bk import bk_report
from aisec_train.train.bk_engine import BKPrivacyEngine

C = 1e-3
D = 6
MODES = ("bk", "ghost", "hooks")


def _private(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str):
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = BKPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip
    if len(wrapped) == 3:  # Opacus' hooks mode
        (private, optimizer, _), criterion = wrapped, nn.CrossEntropyLoss()
    else:
        private, optimizer, criterion, _ = wrapped
    return private, optimizer, criterion


def _clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> tuple[torch.Tensor, str]:
    """The clipped sum the optimizer would noise (noise 0), flattened, and the mode that ran."""
    private, optimizer, criterion = _private(model, x, y, mode)
    private.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        criterion(private(x), y).backward()
        ran = bk_report(private)["mode"]
        if ran == "hooks":  # per-sample gradients: Opacus clips and sums them into p.grad, over the batch size
            optimizer.pre_step()
    scale = len(x) if ran == "hooks" else 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() * scale for p in trainable]
    ), ran


def _own_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), trainable, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, trainable, strict=True)]
    )


def _assert_each_record_within_c(make, x: torch.Tensor, y: torch.Tensor, mode: str) -> str:
    torch.manual_seed(0)
    base = make()
    full, ran = _clipped_sum(copy.deepcopy(base), x, y, mode)
    for j in range(len(x)):
        rest = [i for i in range(len(x)) if i != j]
        contribution = full - _clipped_sum(copy.deepcopy(base), x[rest], y[rest], mode)[0]
        own = _own_gradient(copy.deepcopy(base), x[j : j + 1], y[j : j + 1])
        assert own.norm() > 10 * C  # clipped: the contribution is the record's own direction at norm C
        torch.testing.assert_close(contribution / C, own / own.norm(), atol=1e-3, rtol=1e-3)
    return ran


# --------------------------------------------------------------------------------------------- the user models
class Twice(nn.Module):  # one Linear applied to two inputs (weight reuse)
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Recurrent(nn.Module):  # an RNN-like loop over time steps
    def __init__(self):
        super().__init__()
        self.inp, self.h, self.out = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        steps, h = x.view(len(x), 3, 2), torch.zeros(len(x), 4)
        for t in range(3):
            h = torch.tanh(self.inp(steps[:, t]) + self.h(h))
        return self.out(h)


class TiedModules(nn.Module):  # one Parameter held by two modules
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class OwnParameters(nn.Module):  # x @ self.W + self.bias in the model's own forward, and one parameter unused
    def __init__(self):
        super().__init__()
        self.W, self.bias = nn.Parameter(torch.randn(D, 4) * 0.3), nn.Parameter(torch.zeros(4))
        self.c, self.unused = nn.Linear(4, 3), nn.Linear(4, 4)

    def forward(self, x):
        return self.c(torch.tanh(x @ self.W + self.bias))


class Branches(nn.Module):  # one layer's output read by two branches, a frozen layer between trainable ones
    def __init__(self):
        super().__init__()
        self.a, self.frozen, self.b, self.c = nn.Linear(D, 4), nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.frozen(torch.tanh(self.a(x))))
        return self.b(h) + self.c(h * h)


class Convolutions(nn.Module):  # Conv1d, Conv3d, ConvTranspose2d (the last without a book-keeping rule)
    def __init__(self):
        super().__init__()
        self.c1, self.c3, self.ct = nn.Conv1d(1, 2, 3, padding=1), nn.Conv3d(1, 1, 2), nn.ConvTranspose2d(1, 1, 2)
        self.head = nn.Linear(2 * D + 2 + 12, 3)

    def forward(self, x):
        a = torch.tanh(self.c1(x.view(len(x), 1, D))).flatten(1)
        b = torch.tanh(self.c3(x.view(len(x), 1, 1, 2, 3).expand(-1, -1, 2, -1, -1))).flatten(1)
        c = torch.tanh(self.ct(x.view(len(x), 1, 2, 3))).flatten(1)
        return self.head(torch.cat([a, b, c], 1))


class TiedHead(nn.Module):  # the usual tied output head of a language model: the embedding read outside its forward
    def __init__(self):
        super().__init__()
        self.emb, self.a = nn.Embedding(3, D), nn.Linear(D, D)

    def forward(self, x):
        return F.linear(torch.tanh(self.a(x)), self.emb.weight)


class ReadsAnotherLayersWeight(nn.Module):  # a Linear's weight also used outside the Linear
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(D, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.a(x))) + F.linear(x, self.a.weight)


class RunningMean(nn.Module):  # a buffer updated from the batch in the training forward
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 3)
        self.register_buffer("mean", torch.zeros(D))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.a(x - self.mean)


X, Y = torch.randn(4, D, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [Twice, Recurrent, TiedModules, OwnParameters, Branches, Convolutions])
def test_each_record_s_clipped_contribution_is_its_own_gradient_at_norm_c(make, mode):
    if mode == "ghost" and make in (Twice, Recurrent, TiedModules):
        with pytest.raises(
            ConfigError, match=r"^privacy.grad_sample_mode=ghost \(or bk falling back to it\) is not allowed"
        ):
            _clipped_sum(make(), X, Y, mode)  # Opacus' ghost norms cannot clip a layer run twice: one line
        return
    ran = _assert_each_record_within_c(make, X, Y, mode)
    if mode == "bk" and make in (Twice, Recurrent, Branches):
        assert ran == "bk"  # book-keeping's own rules, cross terms between calls included


def test_an_embedding_with_padding_idx_in_book_keeping():
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(5, 4, padding_idx=0), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)).mean(1))

    tokens = torch.tensor([[0, 1, 1, 2], [0, 0, 3, 3], [4, 0, 2, 1], [1, 1, 1, 1]])
    assert _assert_each_record_within_c(Padded, tokens, Y, "bk") == "bk"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("make", "name"), [(TiedHead, "emb.weight"), (ReadsAnotherLayersWeight, "a.weight")])
def test_a_parameter_used_outside_its_layer_is_refused_before_any_step(make, name, mode):
    torch.manual_seed(0)
    model = make()
    before = [p.detach().clone() for p in model.parameters()]
    private, _, criterion = _private(model, X, Y, mode)
    private.train()
    with pytest.raises(ConfigError, match=f"^parameter '{name}' is used outside its layer's forward"):
        criterion(private(X), Y).backward()  # in the forward: before the optimizer (noise, accountant) runs
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_book_keeping_refuses_an_outside_use_that_starts_after_the_first_forward():
    """The first forward is watched in every mode; book-keeping also refuses at any backward the gradient autograd
    gives one of its layers' parameters (it computes them all itself), so a later step cannot leak either."""

    class Later(ReadsAnotherLayersWeight):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return self.c(torch.tanh(self.a(x))) + (F.linear(x, self.a.weight) if self.calls > 1 else 0)

    private, _, criterion = _private(Later(), X, Y, "bk")
    private.train()
    criterion(private(X), Y).backward()
    with pytest.raises(ConfigError, match=r"^parameter 'a.weight' is used outside its layer's forward"):
        criterion(private(X), Y).backward()


@pytest.mark.parametrize("mode", MODES)
def test_a_buffer_updated_from_the_batch_is_refused(mode):
    private, _, criterion = _private(RunningMean(), X, Y, mode)
    private.train()
    with pytest.raises(ConfigError, match=r"^buffer 'mean' changes in the training forward"):
        private(X)
    private.eval()
    private(X)  # evaluation's forward is not the training step's


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_an_in_place_op_on_a_layer_s_output_is_one_line_in_opacus_modes(mode):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            h.add_(1)
            return self.b(F.relu(h, inplace=True))

    with pytest.raises(ConfigError, match=r"^the model modifies a layer's output in place"):
        _clipped_sum(InPlace(), X, Y, mode)
    _assert_each_record_within_c(InPlace, X, Y, "bk")  # book-keeping clones what it taps: it runs


class TiedHeadOnImages(TiedHead):  # module level: fit saves the model object
    def forward(self, x):
        return super().forward(x.flatten(1))


def test_fit_refuses_a_tied_head_before_any_privacy_is_spent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = TensorDataset(torch.rand(30, 1, 2, 3, generator=torch.Generator().manual_seed(2)), torch.arange(30) % 3)
    overrides = ["train.epochs=1", "privacy.target_epsilon=3", "robustness=none"]
    with pytest.raises(ConfigError, match=r"^parameter 'emb.weight' is used outside its layer's forward"):
        aisec_train.fit(TiedHeadOnImages(), DataLoader(data, batch_size=10), overrides)
    (dataset,) = LedgerStore().datasets()  # the account was opened, and nothing charged to it
    assert LedgerStore().view(dataset).total_epsilon() == 0

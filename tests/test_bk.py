"""Book-keeping DP-SGD (grad_sample_mode=bk) against Opacus itself.

Every supported layer type, odd shapes, batch sizes 1 and 3 and whole models: the clipped, summed gradient
that Opacus' optimizer receives in bk mode equals the one of Opacus' hooks mode (per-sample gradients
materialised, clipped, summed) to 1e-5, with noise 0 so the gradients can be compared. The clip bound sits
between the per-sample norms so that some samples are clipped and some are not. The privacy ledger of a bk
run equals a ghost run's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aisec_train.models import build_model
from aisec_train.train import bk_conv, bk_layers
from aisec_train.train.bk import BKGradSampleModule, bk_report
from aisec_train.train.bk_cost import MEM_FACTOR, Choice, choose
from aisec_train.train.bk_engine import BKPrivacyEngine

TOL = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ harness
def _private(model, x, y, mode, clip, *, noise=0.0, steps_loader=None):
    data = TensorDataset(x, y)
    loader = steps_loader or DataLoader(data, batch_size=len(x))
    engine = BKPrivacyEngine(accountant="rdp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = engine.make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=noise, max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip
    if mode == "hooks":
        return (*out[:2], nn.CrossEntropyLoss(), out[2], engine)
    return (*out, engine)


def _per_sample_norms(model, x, y, loss_fn) -> torch.Tensor:
    """Opacus hooks' per-sample gradient norms (only used to place the clip bound between them)."""
    wrapped, _, criterion, _, _ = _private(copy.deepcopy(model), x, y, "hooks", 1.0)
    loss_fn(wrapped, criterion, x, y).backward()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    return torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)


def _ce(model, criterion, x, y):
    return criterion(model(x), y)


def _trades(model, criterion, x, y):
    """TRADES' shape: two forwards of the same batch (clean, perturbed), one loss, one backward."""
    clean = model(x)
    adv = model(x + 0.1 * torch.sign(torch.sin(13.0 * x)))
    kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
    return criterion(clean, y) + 2.0 * kl


def _step_grads(model, x, y, mode, clip, loss_fn=_ce):
    wrapped, optimizer, criterion, _, _ = _private(model, x, y, mode, clip)
    optimizer.zero_grad(set_to_none=True)
    loss_fn(wrapped, criterion, x, y).backward()
    optimizer.step()  # noise 0, lr 0: p.grad = clipped sum / batch size
    return {n: p.grad.clone() for n, p in wrapped._module.named_parameters() if p.requires_grad}, wrapped


def assert_bk_equals_hooks(make, x, y, loss_fn=_ce) -> nn.Module:
    torch.manual_seed(0)
    model = make()
    norms = _per_sample_norms(model, x, y, loss_fn).sort().values
    clip = float(norms[0] / 2 if len(norms) == 1 else (norms[0] + norms[1]) / 2)  # clips some, not all
    want, _ = _step_grads(copy.deepcopy(model), x, y, "hooks", clip, loss_fn)
    got, wrapped = _step_grads(copy.deepcopy(model), x, y, "bk", clip, loss_fn)
    assert isinstance(wrapped, BKGradSampleModule)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    return wrapped


def _images(b, c, h, w, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randint(0, classes, (b,), generator=g)


def functorch_clipped_mean(model, x, y, clip) -> dict[str, torch.Tensor]:
    """The definition, through torch.func: per-sample gradients, clipped as Opacus does, summed, / batch."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", coef, g) / len(x) for n, g in per_sample.items()}


def assert_bk_equals_functorch(model, x, y, clip=0.05) -> nn.Module:
    want = functorch_clipped_mean(copy.deepcopy(model), x, y, clip)
    got, wrapped = _step_grads(model, x, y, "bk", clip)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    return wrapped


class Tokens(nn.Module):
    """Embedding + LayerNorm + Linear on (B, T, d): the Linear-over-3-D-input case."""

    def __init__(self, vocab=11, width=6, pad=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=pad)
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.norm(self.embed(idx)))).mean(1))


# ------------------------------------------------------------------------------------------------ layers
LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(35, 7), nn.Tanh(), nn.Linear(7, 3)), (1, 5, 7)),
    "linear_3d": (lambda: nn.Sequential(nn.Linear(7, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)), (5, 7)),
    "conv2d": (
        lambda: nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Flatten(), nn.LazyLinear(3)),
        (3, 7, 9),
    ),
    "conv2d_groups_dilation": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=2, groups=2),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        (4, 7, 5),
    ),  # fmt: skip
    "conv2d_depthwise_same": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 3, 4, padding="same", groups=3, bias=False), nn.Flatten(), nn.Linear(3 * 5 * 7, 3)
        ),
        (3, 5, 7),
    ),  # fmt: skip
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
        ),
        (4, 11),
    ),  # fmt: skip
    "groupnorm": (
        lambda: nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)),
        (2, 5, 6),
    ),  # fmt: skip
    "layernorm_2d": (lambda: nn.Sequential(nn.LayerNorm([5, 7]), nn.Flatten(), nn.Linear(35, 3)), (5, 7)),
}


def _materialise(make, shape):
    """Build the model once on a dummy batch so lazy layers have their shapes (Opacus cannot wrap them)."""

    def build():
        torch.manual_seed(0)
        model = make()
        model(torch.zeros(1, *shape))
        return model

    return build


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_equals_opacus_hooks(layer, batch):
    make, shape = LAYERS[layer]
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
    y = torch.arange(batch) % 3
    assert_bk_equals_hooks(_materialise(make, shape), x, y)


def _tokens(batch):
    idx = torch.randint(0, 11, (batch, 9), generator=torch.Generator().manual_seed(4))
    idx[:, 0], idx[:, 1] = 0, idx[:, 2]  # token 0 and a repeated token in every sample
    return idx, torch.arange(batch) % 3


@pytest.mark.parametrize("batch", [1, 3])
def test_embedding_layernorm_linear_3d_equal_opacus_hooks(batch):
    wrapped = assert_bk_equals_hooks(Tokens, *_tokens(batch))
    assert bk_report(wrapped)["layers"]["embed"] == "instantiate"


def test_embedding_padding_idx_equals_definition():
    """padding_idx rows get no gradient (F.embedding's rule); Opacus' hooks sampler ignores padding_idx, so the
    reference here is torch.func."""
    torch.manual_seed(0)
    assert_bk_equals_functorch(Tokens(pad=0), *_tokens(3))


def test_reflect_padding_and_inplace_relu_equal_definition():
    """Cases Opacus' hooks mode cannot run or gets wrong: an in-place ReLU right after a layer (its backward
    hooks refuse it), and padding_mode='reflect' (its conv sampler zero-pads)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 2 * 3, 3),
    )  # fmt: skip
    x, y = _images(3, 2, 6, 8)
    assert_bk_equals_functorch(model, x, y)


METHODS = ["ghost_pixels", "ghost_patches", "instantiate_stored", "instantiate_recomputed"]


def _force(monkeypatch, method: str) -> Choice:
    """The cost model picks one method per shape; tests force each in turn so every path is held exact."""
    forced = Choice("ghost" if method.startswith("ghost") else "instantiate", method == "instantiate_stored", method)
    for module in (bk_layers, bk_conv):
        monkeypatch.setattr(module, "choose", lambda **_: forced)
    monkeypatch.setattr(bk_conv, "ghost_by_pixels", lambda *_: method == "ghost_pixels")
    return forced


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["linear_3d", "conv2d", "conv2d_groups_dilation", "conv2d_depthwise_same", "conv1d"])
def test_every_norm_method_is_exact(monkeypatch, model, method):
    forced = _force(monkeypatch, method)
    make, shape = LAYERS[model]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7))
    wrapped = assert_bk_equals_hooks(_materialise(make, shape), x, torch.tensor([0, 1, 2]))
    assert forced.method in bk_report(wrapped)["layers"].values()


@pytest.mark.parametrize("method", METHODS)
def test_every_norm_method_is_exact_across_two_forwards(monkeypatch, method):
    _force(monkeypatch, method)
    x, y = _images(3, 1, 8, 8, classes=10, seed=5)
    assert_bk_equals_hooks(lambda: build_model("cnn", in_channels=1, num_classes=10, image_size=8), x, y, _trades)


class StridedStream(nn.Module):
    """An MLP-Mixer block on a residual stream in (B, C, T) memory order (``flatten(2).transpose(1, 2)``): its
    LayerNorms get a strided input, and one of them a strided output gradient (through the token Linear)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(2, 4, 2, stride=2)
        self.norm1, self.norm2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.token, self.channel, self.head = nn.Linear(6, 6), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, T=6, C=4), stored as (B, C, T)
        x = x + self.token(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel(self.norm2(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("batch", [1, 3])
def test_layernorm_on_a_strided_residual_stream_equals_opacus_hooks(batch):
    x, y = _images(batch, 2, 4, 6, classes=3, seed=5)
    assert_bk_equals_hooks(StridedStream, x, y)


# ------------------------------------------------------------------------------------------------ whole models
@pytest.mark.parametrize(
    "name,channels,size",
    [("cnn", 1, 8), ("mlp", 1, 5), ("resnet18_gn", 3, 8)],
)
def test_whole_model_equals_opacus_hooks(name, channels, size):
    x, y = _images(3, channels, size, size, classes=10)
    wrapped = assert_bk_equals_hooks(
        lambda: build_model(name, in_channels=channels, num_classes=10, image_size=size), x, y
    )
    report = bk_report(wrapped)
    assert report["mode"] == "bk" and report["fallback"] is None
    assert set(report["layers"].values()) <= {"ghost", "instantiate"}


@pytest.mark.parametrize("batch", [1, 3])
def test_two_forwards_one_backward_equals_opacus_hooks(batch):
    """TRADES: the per-sample gradient sums both passes; the norms need the cross terms between them."""
    x, y = _images(batch, 1, 8, 8, classes=10, seed=3)
    assert_bk_equals_hooks(lambda: build_model("cnn", in_channels=1, num_classes=10, image_size=8), x, y, _trades)


# ------------------------------------------------------------------------------------------------ fallbacks
class Gain(nn.Module):
    """A layer with a parameter but neither a book-keeping rule nor an Opacus grad sampler."""

    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.gain


def test_layer_without_rule_uses_opacus_grad_sampler():
    def make():
        return nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 3))

    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    wrapped = assert_bk_equals_hooks(make, x, torch.tensor([0, 1, 2]))
    report = bk_report(wrapped)
    assert report["mode"] == "bk" and report["layers"]["1"] == "opacus:compute_rms_norm_grad_sample"
    assert "RMSNorm" in report["why"]["1"]


def test_unsupported_layer_falls_back_to_ghost_and_is_reported():
    x, y = torch.randn(6, 5), torch.arange(6) % 3
    model = nn.Sequential(nn.Linear(5, 4), Gain(4), nn.Linear(4, 3))
    wrapped, optimizer, criterion, _, _ = _private(model, x, y, "bk", 1.0, noise=1.0)
    report = bk_report(wrapped)
    assert report["mode"] == "ghost" and report["layers"] == {}
    assert "'1'" in report["fallback"] and "Gain" in report["fallback"]
    criterion(wrapped(x), y).backward()  # the fallback trains through Opacus' own ghost criterion
    optimizer.step()
    assert all(p.grad is not None for p in wrapped.parameters())


def test_fallback_for_several_forwards_per_step_is_hooks():
    x, y = torch.randn(6, 5), torch.arange(6) % 3
    model = nn.Sequential(nn.Linear(5, 4), Gain(4), nn.Linear(4, 3))
    engine = BKPrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped, *_ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=3), noise_multiplier=1.0, max_grad_norm=1.0,
            grad_sample_mode="bk", bk_fallback="hooks",
        )  # fmt: skip
    assert bk_report(wrapped)["mode"] == "hooks" and "Gain" in bk_report(wrapped)["fallback"]


def test_tied_weights_fall_back_to_hooks():
    embed = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, nn.Flatten(), nn.Linear(8, 4), head)
    wrapped, *_ = _private(model, torch.randint(0, 7, (3, 2)), torch.arange(3), "bk", 1.0)
    report = bk_report(wrapped)
    assert report["mode"] == "hooks" and "shared" in report["fallback"]


# ------------------------------------------------------------------------------------------------ mechanism
def test_noise_ledger_and_epsilon_equal_ghost_mode():
    """Same noise generator, Poisson draws and steps: bk and Opacus ghost end with the same parameters,
    accountant history and epsilon (the mechanism is Opacus', only how p.grad is formed differs)."""
    x, y = _images(48, 1, 8, 8, classes=10, seed=9)
    runs = {}
    for mode in ("ghost", "bk"):
        torch.manual_seed(0)
        model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
        engine = BKPrivacyEngine(accountant="prv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, criterion, loader = engine.make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), criterion=nn.CrossEntropyLoss(),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=12), noise_multiplier=1.3, max_grad_norm=0.5,
                grad_sample_mode=mode, noise_generator=torch.Generator().manual_seed(1),
            )  # fmt: skip
        torch.manual_seed(2)  # Poisson draws
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(xb), yb).backward()
            optimizer.step()
        runs[mode] = (model._module.state_dict(), engine.accountant.history, engine.get_epsilon(1e-5))
    (ghost_state, ghost_history, ghost_eps), (bk_state, bk_history, bk_eps) = runs["ghost"], runs["bk"]
    assert bk_history == ghost_history and len(bk_history) == 1 and bk_history[0][2] == 4
    assert bk_eps == ghost_eps
    for name in ghost_state:
        torch.testing.assert_close(bk_state[name], ghost_state[name], **TOL)


def test_physical_batches_add_up_to_the_logical_batch():
    """Opacus' BatchMemoryManager splits a logical batch; the clipped sums of its parts add up."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    x, y = _images(6, 1, 8, 8, classes=10, seed=6)
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    want, _ = _step_grads(copy.deepcopy(model), x, y, "bk", 0.05)
    wrapped, optimizer, criterion, loader, _ = _private(model, x, y, "bk", 0.05)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=optimizer) as batches:
        for xb, yb in batches:
            optimizer.zero_grad(set_to_none=True)
            criterion(wrapped(xb), yb).backward()
            optimizer.step()
    for name, p in wrapped._module.named_parameters():
        torch.testing.assert_close(p.grad, want[name], **TOL)


def test_disabled_hooks_eval_and_cleanup_give_the_plain_model():
    """Attacks switch the hooks off (robust.attacks.attack_mode): then the model is the plain model."""
    x, y = _images(4, 1, 8, 8, classes=10)
    torch.manual_seed(0)
    plain = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    wrapped = BKGradSampleModule(copy.deepcopy(plain), max_grad_norm=1e-3)
    F.cross_entropy(plain(x), y).backward()
    wrapped.disable_hooks()
    F.cross_entropy(wrapped(x), y).backward()  # ordinary autograd: no clipping
    for (name, p), q in zip(wrapped._module.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    wrapped.enable_hooks()
    wrapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), plain.eval()(x))
    wrapped.cleanup()
    assert not any("forward" in m.__dict__ for m in wrapped._module.modules())


def test_input_modified_in_place_before_backward_is_refused():
    class Edits(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x) + 0.0
            out = self.b(h)
            h.mul_(2.0)  # b's kept input no longer is what b saw
            return out

    wrapped = BKGradSampleModule(Edits(), max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        wrapped(torch.randn(2, 3)).sum().backward()


def test_bad_arguments_are_refused_in_one_line():
    from aisec_train.errors import ConfigError

    with pytest.raises(ConfigError, match="max_grad_norm=0"):
        BKGradSampleModule(nn.Linear(2, 2), max_grad_norm=0)
    with pytest.raises(ConfigError, match="loss_reduction='median'"):
        BKGradSampleModule(nn.Linear(2, 2), max_grad_norm=1.0, loss_reduction="median")


def test_sum_and_mean_losses_give_the_same_clipped_sum():
    """p.grad is the clipped sum either way: a mean loss's 1/B is undone before clipping (as Opacus does)."""
    x, y = _images(5, 1, 8, 8, classes=10, seed=8)
    grads = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
        wrapped = BKGradSampleModule(model, max_grad_norm=0.1, loss_reduction=reduction)
        F.cross_entropy(wrapped(x), y, reduction=reduction).backward()
        grads[reduction] = [p.grad for p in model.parameters()]
    for mean, total in zip(grads["mean"], grads["sum"], strict=True):
        torch.testing.assert_close(mean, total, **TOL)


def test_forwards_on_different_batches_before_one_backward_are_refused():
    wrapped = BKGradSampleModule(nn.Linear(3, 2), max_grad_norm=1e9, loss_reduction="sum")
    with pytest.raises(ValueError, match=r"batches of sizes \[2, 4\]"):
        (wrapped(torch.randn(2, 3)).sum() + wrapped(torch.randn(4, 3)).sum()).backward()
    x = torch.randn(2, 3)  # the failed step leaves nothing behind: the next one is the plain gradient
    wrapped.zero_grad(set_to_none=True)
    wrapped(x).sum().backward()
    torch.testing.assert_close(wrapped._module.weight.grad, torch.ones(2, 1) * x.sum(0))


def test_empty_batch_gives_zero_gradients():
    wrapped = BKGradSampleModule(build_model("cnn", in_channels=1, num_classes=10, image_size=8), max_grad_norm=1.0)
    F.cross_entropy(wrapped(torch.zeros(0, 1, 8, 8)), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert all(p.grad is not None and not p.grad.any() for p in wrapped.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_one_weight_gradient_op_per_conv_layer(monkeypatch, method):
    """Book-keeping's point: the non-private weight gradient is never formed next to the clipped one (counted
    at the dispatcher: convolution_backward calls that compute a weight gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WeightGradOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default and args[-1][1]:
                WeightGradOps.count += 1
            return func(*args, **(kwargs or {}))

    _force(monkeypatch, method)
    # Every conv through the convolution op (a first conv with few input channels would take a bmm instead).
    monkeypatch.setattr(bk_conv, "FEW_CHANNELS", 0)
    x, y = _images(3, 1, 8, 8, classes=10)
    wrapped = BKGradSampleModule(build_model("cnn", in_channels=1, num_classes=10, image_size=8), max_grad_norm=1.0)
    with WeightGradOps():
        F.cross_entropy(wrapped(x), y).backward()
    # Two conv layers: one op each; the recomputed variant runs it twice by design (norms, then clipped sum),
    # which the cost model picks only when that beats ghost norms. None of them is autograd's own.
    assert WeightGradOps.count == {"instantiate_recomputed": 4}.get(method, 2)


def test_adversarial_training_step_through_the_project_attack():
    """The loop's adversarial step: an attack through the wrapper (hooks off, robust.attacks.attack_mode), then
    the private step on its output. The attack leaves no trace; the step equals bk on the same inputs."""
    from aisec_train.robust.attacks import fgsm

    x, y = _images(3, 1, 8, 8, classes=10, seed=11)
    x = x.sigmoid()  # attacks clamp to [0, 1]
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    reference = copy.deepcopy(model)
    wrapped, optimizer, criterion, _, _ = _private(model, x, y, "bk", 0.05)
    x_adv = fgsm(wrapped, x, y, eps=0.1, backend="torch")
    assert all(p.grad is None for p in wrapped.parameters()) and not any(r.calls for r in wrapped.records.values())
    wrapped.train()
    optimizer.zero_grad(set_to_none=True)
    criterion(wrapped(x_adv), y).backward()
    optimizer.step()
    want, _ = _step_grads(reference, x_adv, y, "bk", 0.05)
    for name, p in wrapped._module.named_parameters():
        torch.testing.assert_close(p.grad, want[name], **TOL)


@settings(max_examples=200, deadline=None)
@given(
    t=st.integers(1, 4096),
    da=st.integers(1, 2048),
    dg=st.integers(1, 1024),
    groups=st.integers(1, 8),
    kept=st.integers(1, 10**7),
)
def test_each_layer_gets_its_cheapest_allowed_method_and_the_report_says_why(t, da, dg, groups, kept):
    """Mixed ghost clipping's choice: the fewest multiply-adds among the methods whose memory is allowed (stored
    per-sample gradients only when they fit beside the kept tensors), and a reason whose numbers agree with it
    (conv2 of the default model once read "ghost 3.85e+05 <= per-sample 3.13e+05", the stored cost it could not use).
    "Fit" is up to ``MEM_FACTOR`` times the layer's kept floats, which storing frees."""
    ghost, stored, recomputed = t * t * (da + dg) + t * da * dg, t * da * dg + da * dg, 2 * t * da * dg
    fits = groups * da * dg <= MEM_FACTOR * kept
    cost = {"ghost": ghost, "recomputed": recomputed, **({"stored": stored} if fits else {})}
    picked = choose(t=t, da=da, dg=dg, groups=groups, kept=kept)
    name = "ghost" if picked.method == "ghost" else ("stored" if picked.store else "recomputed")
    assert cost[name] == min(cost.values())
    if name == "ghost" and stored < ghost:
        assert "would take" in picked.why and f"{recomputed:.3g}" in picked.why
    elif name == "ghost":
        assert picked.why.endswith(f"ghost {ghost:.3g} <= per-sample {stored:.3g} MAC")


@pytest.mark.parametrize("chunk", [None, 1])  # 1: one sample per chunk (the bmm's [weight | bias] chunk by chunk)
@pytest.mark.parametrize("method", ["instantiate_stored", "instantiate_recomputed"])
@pytest.mark.parametrize("few", [0, 1 << 20])  # every conv by the folded-group op / every conv by patches x bmm
@pytest.mark.parametrize("model", ["conv2d", "conv2d_groups_dilation", "conv2d_depthwise_same", "conv1d"])
def test_both_cpu_per_sample_conv_paths_are_exact(monkeypatch, model, few, method, chunk):
    monkeypatch.setattr(bk_conv, "FEW_CHANNELS", few)
    if chunk is not None:
        monkeypatch.setattr(bk_conv, "_CHUNK", chunk)
    _force(monkeypatch, method)
    make, shape = LAYERS[model]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(8))
    assert_bk_equals_hooks(_materialise(make, shape), x, torch.tensor([0, 1, 2]))


def test_a_first_convs_weight_and_bias_come_from_one_bmm_as_contiguous_gradients():
    """3 input channels: the patch bmm, with a row of ones, gives each sample's [weight | bias]; kept as one
    matrix, its clipped sum is split into contiguous gradients (a strided column would reach the all-reduce)."""
    from aisec_train.train.bk_call import Call

    conv = nn.Conv2d(3, 4, 3, padding=1)
    call = Call((torch.randn(5, 3, 6, 6), [1, 1]), 0)
    call.grad = torch.randn(5, 4, 6, 6)
    processed = bk_conv.ConvRule().norms(conv, dict(conv.named_parameters()), [call])
    assert processed.method == "instantiate" and set(processed.stored) == {"weight_and_bias"}
    per_sample = torch.cat(processed.stored["weight_and_bias"])  # (5, 4, 3 * 9 + 1)
    torch.testing.assert_close(per_sample[..., -1], call.grad.sum((2, 3)))
    weights = torch.rand(5)
    grads = bk_conv.ConvRule().clipped(conv, dict(conv.named_parameters()), processed, [call], weights)
    assert grads[conv.weight].shape == conv.weight.shape and grads[conv.bias].shape == conv.bias.shape
    assert all(g.is_contiguous() for g in grads.values())
    torch.testing.assert_close(grads[conv.bias], weights @ call.grad.sum((2, 3)))


@pytest.mark.parametrize("fold", [1, 2])  # samples per folded-group call: 2 leaves a last call of one sample
@pytest.mark.parametrize("method", ["instantiate_stored", "instantiate_recomputed"])
@pytest.mark.parametrize("model", ["conv2d", "conv2d_groups_dilation", "conv1d"])
def test_folded_per_sample_gradients_in_several_calls_are_exact(monkeypatch, model, method, fold):
    monkeypatch.setattr(bk_conv, "FEW_CHANNELS", 0)  # every conv by the folded-group op
    monkeypatch.setattr(bk_conv, "fold_size", lambda per_sample: fold)
    _force(monkeypatch, method)
    make, shape = LAYERS[model]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(9))
    assert_bk_equals_hooks(_materialise(make, shape), x, torch.tensor([0, 1, 2]))


def test_folded_conv_keeps_per_sample_gradients_up_to_its_own_memory_factor():
    """A 3x3 conv, 8 -> 8 channels on 4x4: per-sample gradients 2.25x its kept floats (as ResNet-18's 128-channel
    layers at 16x16). On the CPU's folded-group op they are kept, in chunks, so the clipped sum is a weighted
    reduce and not a second weight-gradient op; the clipped step stays exact."""
    from aisec_train.train.bk_call import Call

    conv = nn.Conv2d(8, 8, 3, padding=1)
    call = Call((torch.randn(5, 8, 4, 4), [1, 1]), 0)
    call.grad = torch.randn(5, 8, 4, 4)
    per_sample, kept = 8 * 9 * 8, 2 * 8 * 16
    assert bk_conv.MEM_FACTOR * kept < per_sample <= bk_conv.FOLDED_MEM_FACTOR * kept
    processed = bk_conv.ConvRule().norms(conv, {"weight": conv.weight}, [call])
    assert processed.method == "instantiate" and not processed.keep_calls
    assert sum(len(chunk) for chunk in processed.stored["weight"]) == 5
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(128, 3))
    x = torch.randn(5, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    assert_bk_equals_hooks(_materialise(lambda: copy.deepcopy(model), (8, 4, 4)), x, torch.tensor([0, 1, 2, 0, 1]))


def test_fold_size_keeps_each_call_under_the_float_budget():
    for per_sample in [1, 3, 18_432, 147_456, bk_conv.FOLD_FLOATS, 4 * bk_conv.FOLD_FLOATS]:
        n = bk_conv.fold_size(per_sample)
        assert n >= 1 and n & (n - 1) == 0  # a power of two
        assert n == 1 or n * per_sample <= bk_conv.FOLD_FLOATS < 2 * n * per_sample


@pytest.mark.parametrize(
    "calls,k,d,s",
    [
        (((4, 4, 1, 1),), (3, 3), (1, 1), (1, 1)),  # the cnn's conv2: 4x4, padding 1
        (((5, 7, 2, 1),), (3, 3), (2, 1), (2, 1)),  # dilation, stride, unequal padding, non-square
        (((4, 4, 1, 1), (4, 4, 1, 1)), (3, 3), (1, 1), (1, 1)),  # two forward calls: their cross terms too
        (((1, 9, 0, 2),), (1, 5), (1, 1), (1, 2)),  # a Conv1d as height 1
    ],
)
def test_sparse_pixel_spread_equals_the_gather_of_the_padded_gram(calls, k, d, s):
    """The CPU pixel-Gram ghost norm sums kernel offsets with a sparse matmul; it must equal the gather over the
    padded Gram (whose padding row and column are zeros) entry for entry."""
    total = sum(h * w for h, w, _, _ in calls)
    gram = torch.randn(3, total, total, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    index = bk_conv._pixel_index(calls, k, d, s, torch.device("cpu"))
    t2 = len(index) // (k[0] * k[1])
    gathered = F.pad(gram, (0, 1, 0, 1)).flatten(1).index_select(1, index).view(3, -1, t2).sum(1)
    spread = bk_conv._pixel_spread(calls, k, d, s, torch.float64, torch.device("cpu"))
    torch.testing.assert_close((spread @ gram.flatten(1).T).T, gathered)

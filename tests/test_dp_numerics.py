"""The private step's numerics against an adversarial record: one record must not move the step by more than C.

A record whose per-sample gradient norm comes out NaN or inf (a pixel of 1e30, a finite float32 the data checks
pass, squares past float32 inside a ghost norm) used to give that sample a NaN clip factor, which the clipped sum
spread to every parameter: one record made the step and the model non-finite, and training died at the step that
drew it. Now its factor is 0 in book-keeping and in Opacus' ghost mode (train/bk.py, ``finite_clip_factors``):
it is dropped from that step, the model stays finite, and the step equals the step without it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aisec_train.models.presets import MLP
from aisec_train.train.bk import finite_clip_factors
from aisec_train.train.bk_engine import BKPrivacyEngine

CLIP = 1.0


def _clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The sum of clipped per-sample gradients (noise 0) that the private optimizer would noise: ``p.grad``."""
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, _, criterion, _ = BKPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip
    criterion(private(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_a_record_with_a_non_finite_norm_is_dropped_not_spread_to_the_step(mode):
    torch.manual_seed(0)
    model = MLP(1, 3, 8)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    x[0, 0, 2, 2] = 1e30  # finite in float32; its squared norm is not
    poisoned = _clipped_sum(copy.deepcopy(model), x, y, mode)
    assert all(torch.isfinite(g).all() for g in poisoned), "one record made the whole clipped sum non-finite"
    without = _clipped_sum(copy.deepcopy(model), x[1:], y[1:], mode)
    for g, h in zip(poisoned, without, strict=True):  # its contribution is 0: the step is the step without it
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-5)


def test_finite_clip_factors_are_opacus_formula_and_zero_where_the_norm_is_not_finite():
    norms = torch.tensor([0.5, 2.0, float("nan"), float("inf"), 0.0])
    factors = finite_clip_factors(norms, CLIP)
    expected = (CLIP / (norms[:2] + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(factors[:2], expected)
    assert factors[2:4].tolist() == [0.0, 0.0] and factors[4] == 1.0


# ---------------------------------------------------------------------------------- the sensitivity bound
class _Mixed(nn.Module):
    """The layers the private step special-cases: conv (with and without bias), GroupNorm, a sequence Linear
    (ghost norms over T rows), LayerNorm, a frozen layer, a bias-free Linear, an Embedding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.ln = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.fc = nn.Linear(8, 8, bias=False)
        self.emb = nn.Embedding(5, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv2(torch.tanh(self.gn(self.conv(x)))).flatten(2).transpose(1, 2)  # (B, T, 8)
        token = (x[:, 0, 0, 0] * 4.99).long()  # a token per record, from its own pixels
        h = torch.tanh(self.fc(self.frozen(self.ln(h)))).mean(1) + self.emb(token)
        return self.head(h)


def _flat_sum(model, x, y, mode, clip, amp=False) -> torch.Tensor:
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = BKPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip
    private, optimizer = out[0], out[1]
    criterion = nn.CrossEntropyLoss() if mode == "hooks" else out[2]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = criterion(private(x), y)
    loss.backward()
    if mode == "hooks":  # Opacus' hooks optimizer clips at the step: its summed_grad is the clipped sum
        optimizer.clip_and_accumulate()
        grads = [p.summed_grad for p in optimizer.params]
    else:
        grads = [p.grad for p in optimizer.params]
    return torch.cat([g.double().flatten() for g in grads])


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_adding_or_removing_one_record_moves_the_clipped_sum_by_at_most_C(mode):
    """Every private-step implementation privacy.grad_sample_mode selects, on every special-cased layer: the sum
    of clipped per-sample gradients (before noise) of a batch and of the batch without record j differ by <= C,
    to float32 rounding (the 1e-6 in Opacus' clip factor keeps the computed norm at or under C)."""
    torch.manual_seed(0)
    model = _Mixed()
    x, y = torch.rand(5, 3, 5, 5), torch.arange(5) % 4
    clip = 0.05  # below every per-sample norm: all are clipped, the bound is tight
    full = _flat_sum(copy.deepcopy(model), x, y, mode, clip)
    for j in range(len(x)):
        keep = [i for i in range(len(x)) if i != j]
        without = _flat_sum(copy.deepcopy(model), x[keep], y[keep], mode, clip)
        assert float((full - without).norm()) <= clip * (1 + 1e-5), f"record {j} moved the sum by more than C"


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_under_bf16_each_records_own_clipped_gradient_is_within_C(mode):
    """train.precision=bf16 autocasts the forward only; bk and hooks clip float32 per-sample gradients, so a
    record's own clipped gradient is within C as in float32 (what bf16 does to the *other* records' gradients
    through the loss's 1/B: docs/cluster.md). Ghost clipping is not, hence refused below."""
    from aisec_train.train.precision import fp32_per_sample_math

    fp32_per_sample_math()
    torch.manual_seed(0)
    model = _Mixed()
    x, y = torch.rand(4, 3, 5, 5), torch.arange(4) % 4
    for j in range(len(x)):
        own = _flat_sum(copy.deepcopy(model), x[j : j + 1], y[j : j + 1], mode, 0.05, amp=True)
        assert float(own.norm()) <= 0.05 * (1 + 1e-5)


def test_under_bf16_ghost_clipping_exceeds_C_so_the_loop_refuses_it():
    """Opacus' ghost clipping forms the clipped sum in a second backward through the bf16 forward: a record's own
    clipped gradient came out at 1.002 C here (before: the loop trained it and claimed the epsilon of C)."""
    from aisec_train.errors import ConfigError
    from aisec_train.train.config import GradSampleMode, PrivacyConfig, TrainConfig
    from aisec_train.train.loop import train
    from aisec_train.train.precision import fp32_per_sample_math

    fp32_per_sample_math()
    torch.manual_seed(0)
    model = _Mixed()
    x, y = torch.rand(4, 3, 5, 5), torch.arange(4) % 4
    own = max(float(_flat_sum(copy.deepcopy(model), x[j : j + 1], y[j : j + 1], "ghost", 0.05, amp=True).norm())
              for j in range(len(x)))  # fmt: skip
    assert own > 0.05 * (1 + 1e-4)  # the reason for the refusal (if ghost ever clips in fp32, drop it)
    cfg = TrainConfig(epochs=1, batch_size=4, ema_decay=0.0, precision="bf16")
    privacy = PrivacyConfig(noise_multiplier=1.0, delta=1e-3, grad_sample_mode=GradSampleMode.ghost)
    with pytest.raises(ConfigError, match=r"train.precision='bf16' is not allowed with Opacus' ghost clipping "
                       r"\(privacy.grad_sample_mode=ghost\)"):  # fmt: skip
        train(
            model, TensorDataset(x, y), train_cfg=cfg, privacy_cfg=privacy, device=torch.device("cpu"), progress=False
        )


@pytest.mark.parametrize(
    "overrides,why",
    [
        (["privacy.grad_sample_mode=ghost"], "privacy.grad_sample_mode=ghost"),
        (["train.distributed.nproc=2"], "2 data-parallel ranks clip bk's steps with it"),
    ],
)
def test_bf16_under_ghost_clipping_is_refused_with_the_config_before_ranks_launch(overrides, why):
    """The config refuses what it already knows will clip with ghost (before, data-parallel ranks launched first
    and each refused in the loop); hooks and one-process bk stay allowed, and TRADES' data-parallel bk is hooks."""
    import re

    from aisec_train.api import compose
    from aisec_train.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"Opacus' ghost clipping ({why})")):
        compose(["train.precision=bf16", *overrides])
    compose(["train.precision=bf16", "privacy.grad_sample_mode=hooks", "train.distributed.nproc=2"])
    compose(["train.precision=bf16"])  # bk in one process
    compose(["train.precision=bf16", "train.distributed.nproc=2", "robustness=trades"])


# --------------------------------------------------------------------------------------- empty Poisson batches
@pytest.mark.parametrize("mode,augmult", [("bk", 1), ("ghost", 1), ("hooks", 1), ("hooks", 2)])
def test_empty_poisson_batches_take_their_noisy_step_in_every_mode(mode, augmult):
    """Before: the first empty batch after a step crashed the run with Opacus' "Gradients haven't been cleared
    since the last optimizer step" (bk, ghost) or "Per sample gradient is not initialized" (hooks), a traceback
    part-way through training, whenever the expected batch was small (here 1 record of 40: about 37% of the
    steps draw none; the chance of no empty batch in 40 steps is about 1e-8)."""
    from aisec_train.train.config import GradSampleMode, PrivacyConfig, TrainConfig
    from aisec_train.train.loop import train

    torch.manual_seed(0)
    model = MLP(1, 2, 4)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 2
    cfg = TrainConfig(epochs=1, batch_size=1, ema_decay=0.0, lr=0.1, augmult=augmult)
    privacy = PrivacyConfig(noise_multiplier=1.0, delta=1e-3, grad_sample_mode=GradSampleMode(mode))
    result = train(model, TensorDataset(x, y), train_cfg=cfg, privacy_cfg=privacy, device=torch.device("cpu"),
                   progress=False)  # fmt: skip
    assert result.ledger.steps == 40  # every draw, empty or not, is a charged step
    after = list(result.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # noised, empty steps too


# ------------------------------------------------------------------- bf16: one record moves only its own gradient
def _loop_clipped_sum(model, x, y, mode, clip, precision) -> torch.Tensor:
    """The clipped sum as the loop forms it: make_private as the loop calls it, the forward under the loop's
    autocast, the loop's backward (train/precision.py)."""
    from aisec_train.privacy.engine import make_private
    from aisec_train.privacy.ledger import PrivacyLedger
    from aisec_train.train.config import GradSampleMode, PrivacyConfig
    from aisec_train.train.precision import Precision

    amp = Precision(precision, torch.device("cpu"))
    cfg = PrivacyConfig(noise_multiplier=1.0, max_grad_norm=clip, delta=1e-3, grad_sample_mode=GradSampleMode(mode))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = make_private(
            model, optimizer, DataLoader(TensorDataset(x, y), batch_size=len(x)), cfg,
            ledger=PrivacyLedger("rdp", 1e-3), epochs=1, noise_generator=torch.Generator(),
            sum_backward=amp.sum_backward(True),
        )  # fmt: skip
    with amp.autocast():
        loss = dp.criterion(dp.model(x), y)
    amp.backward(loss, rows=len(y), private=True)
    if mode == "hooks":
        dp.optimizer.clip_and_accumulate()
        grads = [p.summed_grad for p in dp.optimizer.params]
    else:
        grads = [p.grad for p in dp.optimizer.params]
    return torch.cat([g.double().flatten() for g in grads])


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_under_bf16_adding_one_record_moves_the_clipped_sum_by_at_most_C(mode):
    """Before: the mean loss's 1/B entered every gradient before the bf16 backward rounded it, and B is what a
    record changes under Poisson sampling: removing one record moved the sum by 1.0005-1.0018 C on this model
    (1.008 C on SmallCNN at B = 512: the other records' gradients re-rounded). Now the bf16 private step
    backpropagates the sum: as in float32."""
    torch.manual_seed(0)
    model = _Mixed()
    x, y = torch.rand(6, 3, 5, 5), torch.arange(6) % 4
    clip = 0.05
    full = _loop_clipped_sum(copy.deepcopy(model), x, y, mode, clip, "bf16")
    worst = 0.0
    for j in range(len(x)):
        keep = [i for i in range(len(x)) if i != j]
        worst = max(worst, float((full - _loop_clipped_sum(copy.deepcopy(model), x[keep], y[keep], mode, clip,
                                                           "bf16")).norm()))  # fmt: skip
    assert worst <= clip * (1 + 1e-5), f"one record moved the bf16 clipped sum by {worst / clip:.6f} C"
    # the same step as float32 up to bf16's rounding of the forward: the scale (sum, not B times the mean) is right
    fp32 = _loop_clipped_sum(copy.deepcopy(model), x, y, mode, clip, "32")
    assert float((full - fp32).norm()) <= 0.05 * float(fp32.norm())


# ------------------------------------------------------------------------ data-parallel: one draw, one step
def _sampler(cls, seed: int):
    """A rank-0-of-2 distributed Poisson sampler without a process group (its __init__ asks torch.distributed)."""
    sampler = object.__new__(cls)
    sampler.__dict__.update(
        total_size=48, sample_rate=1 / 24, generator=torch.Generator().manual_seed(seed), num_replicas=2, rank=0,
        epoch=0, shuffle=True, shuffle_seed=0, num_samples=24, num_batches=24,
    )  # fmt: skip
    return sampler


def test_a_ranks_empty_draw_is_a_step_with_the_same_coins_as_opacus():
    """Opacus' distributed sampler skipped a rank's empty draw, so ranks took different numbers of steps and a
    record entered a step at more than the charged rate; ours yields it (an empty step), with Opacus' coins."""
    from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler

    from aisec_train.privacy.engine import EveryDrawSampler

    ours = [b.tolist() for b in _sampler(EveryDrawSampler, 3)]
    theirs = [b.tolist() for b in _sampler(DistributedUniformWithReplacementSampler, 3)]
    assert len(ours) == 24 and any(not b for b in ours)  # every draw is a step, the empty ones too
    assert [b for b in ours if b] == theirs  # the same records in the same draws


@pytest.mark.slow
def test_data_parallel_dp_takes_every_planned_step_and_refuses_an_exhausted_budget_in_one_line(tmp_path):
    """nproc=2 on gloo, 48 training records, batch 2 (an expected record a rank a step, so empty draws are common).
    Before: 33 and 48 steps in two runs of a plan of 48 (ranks out of step), and the dataset's budget refusal in
    rank 0 came back as an elastic traceback with exit status 1."""
    import numpy as np

    from tests.conftest import read_report, run_cli

    rng = np.random.default_rng(3)
    data = tmp_path / "small.npz"
    np.savez(data, x=rng.random((60, 8, 8)).astype(np.float32), y=np.arange(60) % 3)
    env = {"AISEC_TRAIN_LEDGER_STORE": str(tmp_path / "store")}
    (tmp_path / "store").mkdir()
    args = ["dataset=npz", f"dataset.path={data}", "model=mlp", "train.epochs=2", "train.batch_size=2", "audit=off",
            "robustness.evaluate=false", "robustness=none", "privacy.delta=1e-3", "train.distributed.nproc=2",
            "train.device=cpu"]  # fmt: skip
    first = run_cli(*args, f"hydra.run.dir={tmp_path / 'a'}", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    privacy = read_report(tmp_path / "a")["privacy"]
    assert privacy["sample_rate"] == pytest.approx(1 / 24) and privacy["steps"] == 48  # as one process
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    steps = [int(row.split(",")[rows[0].split(",").index("steps")]) for row in rows[1:]]
    assert steps == [24, 48]  # 1/q steps an epoch on every rank (before: 17, 33 and 47, 48)
    again = run_cli(*args, f"hydra.run.dir={tmp_path / 'b'}", env=env)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("aisec-train: error: privacy budget exhausted")
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_the_bf16_summed_backward_still_steps_on_the_mean_over_the_expected_batch(mode):
    """The summed backward changes only what the per-sample machinery scales: the optimizer still divides the
    (here noiseless) clipped sum by the expected batch, so the update is float32's up to bf16 rounding."""
    from aisec_train.privacy.engine import make_private
    from aisec_train.privacy.ledger import PrivacyLedger
    from aisec_train.train.config import GradSampleMode, PrivacyConfig
    from aisec_train.train.precision import Precision

    torch.manual_seed(0)
    model0, (x, y) = _Mixed(), (torch.rand(6, 3, 5, 5), torch.arange(6) % 4)
    steps = {}
    for precision in ("32", "bf16"):
        model, amp = copy.deepcopy(model0), Precision(precision, torch.device("cpu"))
        cfg = PrivacyConfig(noise_multiplier=1.0, max_grad_norm=0.05, delta=1e-3, grad_sample_mode=GradSampleMode(mode))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = make_private(
                model, torch.optim.SGD(model.parameters(), lr=0.0), DataLoader(TensorDataset(x, y), batch_size=6),
                cfg, ledger=PrivacyLedger("rdp", 1e-3), epochs=1, noise_generator=torch.Generator(),
                sum_backward=amp.sum_backward(True),
            )  # fmt: skip
        with amp.autocast():
            loss = dp.criterion(dp.model(x), y)
        amp.backward(loss, rows=len(y), private=True)
        dp.optimizer.noise_multiplier = 0.0  # the update itself, without its noise
        dp.optimizer.pre_step()
        steps[precision] = torch.cat([p.grad.flatten() for p in dp.optimizer.params])
    assert float((steps["bf16"] - steps["32"]).norm()) <= 0.01 * float(steps["32"].norm())

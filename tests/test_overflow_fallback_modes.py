"""A record whose forward overflows (a pixel of 3e38 through ``SmallCNN``'s ``2x - 1``: inf activations, NaN
per-sample gradients) under the Opacus modes, ``privacy.grad_sample_mode=hooks`` and ``ghost``.

``bk`` drops such a record from its step (tests/test_overflow_record.py). Under ``hooks`` Opacus formed the clipped
sum itself: the record's NaN norm gave it a NaN factor, and even a zero one is NaN against ``inf`` rows, so the step
and the model went NaN and the run stopped at the step that first drew the record (its step number told when the
secret Poisson draws picked it; one poisoned record stopped anyone's run). Now its rows of every ``p.grad_sample`` are
zeroed before Opacus clips (train/bk_engine.py, ``_drop_non_finite_records``): the step is the step without it, with
``train.augmult`` too. Under ``ghost`` the second backward multiplies the record's inf activations by its zero
weight, which no reweighting of the loss can undo: the run stops in one line and releases no model (docs/privacy.md).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aisec_train.models.presets import SmallCNN
from aisec_train.train import augmult, checkpoint
from aisec_train.train.bk_engine import BKPrivacyEngine
from aisec_train.train.callbacks import NonFiniteError
from aisec_train.train.config import GradSampleMode, PrivacyConfig, TrainConfig
from aisec_train.train.loop import train
from tests.conftest import read_report, run_cli
from tests.drills import screen_lines
from tests.fuzzing import BASE, call_cli, refusal_problems

OVERFLOW = 3e38  # finite in float32; 2x - 1 is not


def _hooks_private(model: nn.Module, loader: DataLoader):
    """(private model, optimizer) of hooks mode through our engine, noise 0, the whole loader's batches fixed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, _ = BKPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks",
        )  # fmt: skip
    return private, optimizer


def _hooks_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int = 1) -> list[torch.Tensor]:
    """The clipped sum (noise 0) that hooks mode's optimizer noises, each record seen as K augmult views."""
    private, optimizer = _hooks_private(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    if k > 1:
        augmult.install(optimizer, k)
        x, y = x.repeat_interleave(k, dim=0), y.repeat_interleave(k)  # K views (unshifted: the same either way)
        x[1::k] = 1 - x[1::k]  # so a record's views differ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.CrossEntropyLoss()(private(x), y).backward()
    optimizer.pre_step()
    return [p.summed_grad.detach().clone() for p in optimizer.params]


@pytest.mark.parametrize("k", [1, 2])
def test_under_hooks_a_record_whose_forward_overflows_is_dropped_from_its_step(k):
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, image_size=8)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    x[0] = OVERFLOW
    poisoned = _hooks_clipped_sum(copy.deepcopy(model), x, y, k)
    assert all(torch.isfinite(g).all() for g in poisoned), "one record made the clipped sum non-finite"
    without = _hooks_clipped_sum(copy.deepcopy(model), x[1:], y[1:], k)
    for g, h in zip(poisoned, without, strict=True):  # its contribution is 0: the step is the step without it
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


def test_under_hooks_several_backwards_before_a_step_keep_their_rows_and_drop_the_record():
    """``p.grad_sample`` is a list when backwards accumulate before a step; Opacus counts its length to scale the
    step, so the rows are zeroed in place and the list stays a list of the same length."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, image_size=8)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    x[5] = OVERFLOW
    private, optimizer = _hooks_private(copy.deepcopy(model), DataLoader(TensorDataset(x, y), batch_size=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for half in (slice(0, 4), slice(4, 8)):
            nn.CrossEntropyLoss()(private(x[half]), y[half]).backward()
    assert all(isinstance(p.grad_sample, list) and len(p.grad_sample) == 2 for p in optimizer.params)
    optimizer.pre_step()
    assert optimizer.accumulated_iterations == 2
    keep = torch.arange(8) != 5
    without = _hooks_clipped_sum(copy.deepcopy(model), x[keep], y[keep])
    for p, h in zip(optimizer.params, without, strict=True):
        torch.testing.assert_close(p.summed_grad, h, atol=1e-5, rtol=1e-4)


class _CountNorms(torch.overrides.TorchFunctionMode):
    """Counts the per-sample norm ops (``Tensor.norm`` along a dimension) run inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.norm, torch.norm) and (len(args) > 2 or "dim" in kwargs):
            self.calls += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("overflow", [False, True])
def test_under_hooks_an_ordinary_step_computes_the_per_sample_norms_once(overflow):
    """Opacus clips first; only a non-finite clipped sum sends the step through the drop (which computes the norms
    again). Before, every step computed them twice: 5-10 ms a step at batch 256."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, image_size=8)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    if overflow:
        x[0] = OVERFLOW
    private, optimizer = _hooks_private(model, DataLoader(TensorDataset(x, y), batch_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.CrossEntropyLoss()(private(x), y).backward()
    with _CountNorms() as counted:
        optimizer.pre_step()
    once = len(optimizer.params) + 1  # Opacus: one norm per parameter, then the norm of the stacked norms
    assert counted.calls == (3 * once if overflow else once)  # overflow: Opacus, ours, Opacus again
    assert all(torch.isfinite(p.summed_grad).all() for p in optimizer.params)


def test_under_ghost_the_run_stops_before_the_non_finite_step_in_one_line():
    """Not exact under ghost: the second backward is NaN in every parameter (docs/privacy.md); the step is refused
    before the inner optimizer applies it, so the weights stay as they were."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, image_size=8)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    x[0] = OVERFLOW
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, criterion, _ = BKPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode="ghost",
        )  # fmt: skip
        criterion(private(x), y).backward()
    with pytest.raises(NonFiniteError, match=r"^training stopped: the private step became non-finite under Opacus' "):
        optimizer.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def _npz(tmp_path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8), dtype=np.float32)
    x[5] = OVERFLOW  # smoke's batch covers the data (sample rate 1): every step draws it
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(64) % 2)
    np.savez(tmp_path / "test.npz", x=rng.random((16, 8, 8), dtype=np.float32), y=np.arange(16) % 2)
    return f"dataset.path={tmp_path / 'train.npz'}", f"dataset.test_path={tmp_path / 'test.npz'}"


CLI = [*BASE, "dataset=npz", "train.epochs=2", "privacy.ledger_store=scratch"]


@pytest.mark.slow
def test_a_hooks_run_with_such_a_record_in_the_data_finishes_with_finite_weights(tmp_path):
    run = tmp_path / "run"
    code, err, crash = call_cli([*CLI, *_npz(tmp_path), "privacy.grad_sample_mode=hooks", f"hydra.run.dir={run}"])
    assert code == 0 and not crash, (err[-2000:], crash)
    report = read_report(run)
    assert report["privacy"]["grad_sample_mode"] == "hooks" and report["privacy"]["steps"] == 2
    assert report["privacy"]["sample_rate"] == 1.0  # both steps drew the record
    state = checkpoint.load(run / "model.pt", report["model"]["sha256"])
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_ghost_run_with_such_a_record_stops_in_one_line_and_releases_no_model(tmp_path):
    run = tmp_path / "run"
    code, err, crash = call_cli([*CLI, *_npz(tmp_path), "privacy.grad_sample_mode=ghost", f"hydra.run.dir={run}"])
    assert refusal_problems(run, code, err, crash) == [], (code, err[-2000:], crash)
    assert "cannot drop a record whose forward overflows" in err and "privacy.grad_sample_mode=hooks" in err


def test_a_hooks_run_with_augmult_trains_on_past_such_a_record():
    """The loop's own wiring: augmult averages a record's views, then the record is dropped (one process)."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, image_size=8)
    x, y = torch.rand(32, 1, 8, 8), torch.arange(32) % 3
    x[5] = OVERFLOW
    cfg = TrainConfig(epochs=2, batch_size=32, ema_decay=0.0, lr=0.1, augmult=2)  # sample rate 1: drawn every step
    privacy = PrivacyConfig(noise_multiplier=4.0, delta=1e-3, grad_sample_mode=GradSampleMode.hooks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(model, TensorDataset(x, y), train_cfg=cfg, privacy_cfg=privacy, device=torch.device("cpu"),
                       progress=False)  # fmt: skip
    assert result.ledger.steps == 2 and len(result.history) == 2
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.slow
def test_data_parallel_runs_drop_it_under_hooks_and_stop_in_one_line_under_bks_ghost_fallback(tmp_path):
    """Data-parallel ``bk`` runs Opacus' distributed ghost mode (privacy/engine.py); ``hooks`` its distributed
    optimizer, whose clipping is the one-process clip of each rank's rows (two real gloo processes)."""
    args = [*CLI, *_npz(tmp_path), "train.epochs=1", "train.distributed.nproc=2"]
    proc = run_cli(*args, "privacy.grad_sample_mode=hooks", f"hydra.run.dir={tmp_path / 'hooks'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(tmp_path / "hooks")
    state = checkpoint.load(tmp_path / "hooks" / "model.pt", report["model"]["sha256"])
    assert report["privacy"]["sample_rate"] == 1.0
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'bk'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = screen_lines(proc.stderr)  # [-1]: rank 0's progress bar stays on its own line (reported, not here)
    assert lines[-1].startswith("aisec-train: error: training stopped: the private step"), lines
    assert not (tmp_path / "bk" / "model.pt").exists() and not (tmp_path / "bk" / "report.json").exists()

"""What a run logs must not tell when the secret draws picked a record (docs/privacy.md, "What the randomness
protects against").

A record whose forward overflows (a pixel of 3e38 through SmallCNN's ``2x - 1``) is dropped from the private step
(tests/test_overflow_record.py, tests/test_overflow_fallback_modes.py), but the logged training loss was NaN at
exactly the steps and epochs that drew it (metrics.csv, the trackers, the progress bar), and the clip fraction
counted it as an unclipped record: both said when the secret Poisson draws picked it. Under DP they are now over
the records the step used; non-private runs still stop on the NaN loss.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from aisec_train.models.presets import SmallCNN
from aisec_train.tracking.callback import StepBuffer, StepLogger
from aisec_train.train.callbacks import NonFiniteError
from aisec_train.train.config import GradSampleMode, PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.train.loop import train
from tests.conftest import run_cli
from tests.fuzzing import BASE, call_cli

OVERFLOW = 3e38  # finite in float32; 2x - 1 is not


def _data(overflow: bool) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, 1, 8, 8, generator=g), torch.arange(32) % 3
    if overflow:
        x[5] = OVERFLOW
        return TensorDataset(x, y)
    keep = torch.arange(32) != 5
    return TensorDataset(x[keep], y[keep])


def _first_step(dataset: TensorDataset, mode: str, augmult: int = 1) -> tuple[dict, list]:
    """Step 1's logged values and the epoch rows; the batch is the whole set (sample rate 1), so step 1's loss and
    norms are those of the same model on the same records whatever the noise."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, image_size=8)
    cfg = TrainConfig(epochs=2, batch_size=len(dataset), ema_decay=0.0, lr=0.1, augmult=augmult)
    privacy = PrivacyConfig(noise_multiplier=4.0, delta=1e-3, grad_sample_mode=GradSampleMode(mode), max_grad_norm=0.5)
    sink = StepBuffer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(model, dataset, train_cfg=cfg, privacy_cfg=privacy, device=torch.device("cpu"),
                       callbacks=[StepLogger(sink)], progress=False)  # fmt: skip
    steps = [values for values, _, axis in sink.records if axis == "step"]
    return steps[0], result.history


@pytest.mark.parametrize(("mode", "augmult"), [("bk", 1), ("hooks", 1), ("hooks", 2)])
def test_the_logged_loss_is_the_loss_over_the_records_the_step_used(mode, augmult):
    with_record, history = _first_step(_data(overflow=True), mode, augmult)
    without, _ = _first_step(_data(overflow=False), mode, augmult)
    assert math.isfinite(with_record["loss"]), with_record  # it was nan at every step that drew the record
    if augmult == 1:  # the views' random shifts are drawn per record: with one record fewer they differ
        assert with_record["loss"] == pytest.approx(without["loss"], rel=1e-5)  # left out, as the step leaves it
    assert all(math.isfinite(row["loss"]) for row in history), history
    if mode == "bk":  # counted as an unclipped record before: 30/32 against 30/31 without it
        assert with_record["clip_fraction"] == pytest.approx(without["clip_fraction"])


def test_a_non_private_run_still_stops_on_the_nan_loss():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, image_size=8)
    cfg = TrainConfig(epochs=1, batch_size=32, ema_decay=0.0, lr=0.1)
    with pytest.raises(NonFiniteError, match=r"^training stopped: the loss became nan at epoch 1 \(step 1\)"):
        train(model, _data(overflow=True), train_cfg=cfg, privacy_cfg=PrivacyConfig(mode=PrivacyMode.none),
              device=torch.device("cpu"), progress=False)  # fmt: skip


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_private_cli_run_logs_no_nan_where_the_draws_picked_such_a_record(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8), dtype=np.float32)
    x[5] = OVERFLOW  # smoke's batch covers the data (sample rate 1): every step draws it
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(64) % 2)
    np.savez(tmp_path / "test.npz", x=rng.random((16, 8, 8), dtype=np.float32), y=np.arange(16) % 2)
    run = tmp_path / "run"
    code, err, crash = call_cli([
        *BASE, "dataset=npz", f"dataset.path={tmp_path / 'train.npz'}", f"dataset.test_path={tmp_path / 'test.npz'}",
        "train.epochs=2", "privacy.ledger_store=scratch", "logger=csv", f"hydra.run.dir={run}",
    ])  # fmt: skip
    assert code == 0 and not crash, (err[-2000:], crash)
    epochs = _rows(run / "metrics.csv")
    assert len(epochs) == 2 and all(math.isfinite(float(r["loss"])) for r in epochs), epochs
    tracked = _rows(run / "tracking" / "metrics.csv")
    step_losses = [float(r["value"]) for r in tracked if r["key"] == "step/loss"]
    epoch_losses = [float(r["value"]) for r in tracked if r["key"] == "epoch/loss"]
    assert len(step_losses) == 2 and len(epoch_losses) == 2, tracked  # a NaN was left out of the trackers
    assert all(math.isfinite(v) for v in step_losses + epoch_losses)
    fractions = [float(r["value"]) for r in tracked if r["key"] == "step/clip_fraction"]
    assert fractions and all(f * 63 == pytest.approx(round(f * 63)) for f in fractions)  # over the 63 kept
    assert not any("dropped" in r["key"] or "left_out" in r["key"] for r in tracked)


@pytest.mark.parametrize("job", [BASE, ["experiment=backdoor", "audit=off", "robustness.evaluate=false"]],
                         ids=["smoke", "backdoor"])  # fmt: skip
def test_a_model_whose_every_output_overflows_is_never_released(tmp_path, monkeypatch, job):
    """Dropping each record whose forward overflows keeps a private run's weights finite, so a run whose learning
    rate blew the model up (every record overflowing) trained on, on noise alone, and released model.pt with finite
    weights and infinite outputs, exit 0. Now the evaluate stage refuses a model whose outputs on at least half the
    test split are not finite, in one line, before any later stage or the release; the steps taken stay charged.
    With the backdoor defence on, that model was an SVD traceback in its detector: refused after training now."""
    import json

    from aisec_train.train.loop import check_outputs_finite, evaluate

    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(tmp_path / "ledgers"))
    run = tmp_path / "run"
    code, err, crash = call_cli([*job, "train.epochs=2", "train.lr=1e30", "logger=csv", f"hydra.run.dir={run}"])
    assert code == 2 and not crash, (err[-2000:], crash)
    # The last epoch kept no record: its loss is undefined (NaN, which the trackers leave out), not a perfect-fit 0.0
    tracked = (run / "tracking/metrics.csv").read_text().splitlines()
    assert "epoch,2,epoch/train_accuracy,0.0" in tracked and not [
        r for r in tracked if r.startswith("epoch,2,epoch/loss")
    ]
    line = err.strip().splitlines()[-1]
    assert line.startswith("aisec-train: error: the trained model's outputs are non-finite on "), line
    assert "though its weights are finite" in line and "model.pt is not written" in line
    assert not (run / "model.pt").exists() and not (run / "report.json").exists()
    charged = sum(
        sum(n for _, _, n in record["history"])
        for path in (tmp_path / "ledgers").glob("*.json")
        for record in json.loads(path.read_text())["records"]
        if record["kind"] == "charge"
    )
    assert charged > 0  # the steps were taken and spent: charged, refused release or not

    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(1e30)  # finite weights, overflowing outputs on inputs of 1e10
    rows = TensorDataset(torch.cat([torch.ones(2, 4), torch.full((3, 4), 1e10)]), torch.zeros(5, dtype=torch.long))
    assert evaluate(model, rows, torch.device("cpu"))[1] == 3
    check_outputs_finite(1, 3, 0.1)  # one extreme test input among three: counted in the report, not a refusal
    with pytest.raises(NonFiniteError, match=r"^the trained model's outputs are non-finite on 2 of 4 test records"):
        check_outputs_finite(2, 4, 0.1)


# ---- client-level DP: Flower's log of a crashing client ---------------------------------------------------------
FED = (
    "federated=fedavg", "privacy=none", "dataset=synthetic", "dataset.n_samples=400", "audit=off",
    "robustness.evaluate=false", "federated.clients=4", "federated.fraction_train=1.0", "federated.min_clients=1",
    "federated.rounds=1", "federated.local_epochs=1", "federated.ray_num_cpus=2", "federated.inject.crash=[1]",
)  # fmt: skip
CRASH = "client 1: injected crash"  # the drill's own text names the client, as a path under client_state/ would


def _crash_run(tmp_path, dp: str) -> tuple[str, str]:
    """(console, cli.log) of a real simulation in which client 1's ClientApp raises."""
    run = tmp_path / dp
    proc = run_cli(*FED, f"federated.dp={dp}", f"hydra.run.dir={run}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, (run / "cli.log").read_text()


def _flower_lines(active: bool) -> list[str]:
    """What Flower's logger prints of its simulation worker's records for one crash (as vce_api.py logs them)."""
    from flwr.common.logger import FLOWER_LOGGER

    from aisec_train.quiet import withheld_client_detail

    worker = "/x/site-packages/flwr/server/superlink/fleet/vce/vce_api.py"
    try:
        raise RuntimeError("client 1: injected crash (federated.inject.crash) in round 1")
    except RuntimeError as err:
        crash = err
    records = [
        (worker.replace("vce_api", "backend/raybackend"), "An exception was raised when processing a message by %s",
         ("RayBackend",)),
        (worker, crash, ()),
        (worker, "Traceback (most recent call last):\n  ...\nRuntimeError: client 1: injected crash", ()),
        (worker.replace("server/superlink/fleet/vce/vce_api", "simulation/ray_transport/ray_actor"),
         "The VirtualClient %s got result from client %s", ("1", "2")),
        ("/x/site-packages/flwr/serverapp/strategy/strategy.py", "server side: %s", ("kept",)),
    ]  # fmt: skip
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    FLOWER_LOGGER.addHandler(handler)
    try:
        with withheld_client_detail(active):
            for path, msg, args in records:
                FLOWER_LOGGER.handle(logging.LogRecord("flwr", logging.ERROR, path, 1, msg, args, None))
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    return lines


def test_flowers_crash_records_are_one_line_naming_no_client_under_client_level_dp_only():
    (failed, cid, server) = _flower_lines(active=True)
    assert failed.startswith("a client failed: RuntimeError (") and "client 1" not in failed
    assert cid == "The VirtualClient <withheld> got result from client <withheld>" and server == "server side: kept"
    kept = _flower_lines(active=False)  # and the filter is gone once the run ends (an API session runs on)
    assert len(kept) == 5 and any("client 1: injected crash" in x for x in kept)


@pytest.mark.slow  # a real Flower simulation, 4 clients, 1 round: ~60 s
def test_under_client_level_dp_a_crashing_client_is_logged_without_naming_it(tmp_path):
    for text in _crash_run(tmp_path, "client"):
        assert CRASH not in text and "Traceback" not in text and "client 1" not in text, text[-3000:]
        (line,) = [x for x in text.splitlines() if "a client failed" in x]  # one line, the reason's type kept
        assert "[flwr][ERROR]" in line and "a client failed: RuntimeError (" in line and "federated.dp=client" in line


@pytest.mark.slow  # a real Flower simulation, 4 clients, 1 round: ~60 s
def test_without_client_level_dp_the_crash_keeps_its_detail(tmp_path):
    for text in _crash_run(tmp_path, "none"):
        assert CRASH in text and "Traceback" in text and "a client failed" not in text, text[-3000:]

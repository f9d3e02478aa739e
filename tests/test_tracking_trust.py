"""What the experiment trackers may be trusted with and to do (aisec_train/tracking/): a run refused before its first
step leaves no tracking data and the previous run's untouched; a multirun's MLflow store is never written through a
symlink; a URL's credentials never reach a tracker; a killed tracking child is named as killed; a key set under a
logger that is off is named in one line."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from aisec_train import compose
from aisec_train.errors import ConfigError
from aisec_train.store import IntegrityError
from aisec_train.tracking import TrackingError, open_tracker
from aisec_train.tracking.base import RunInfo, redact
from aisec_train.tracking.config import logger_off
from tests.conftest import read_report, run_cli

FAST = ("audit=off", "robustness.evaluate=false", "train.epochs=1")


def test_a_run_that_fails_before_its_first_figure_leaves_no_tracking_data(tmp_path):
    """A refusal after the trackers opened (a spent budget, a resume that changes the mechanism, bad data) used to
    leave tracking/params.json, a header-only metrics.csv and a TensorBoard event file behind, and overwrote the
    params.json of the run it would have resumed with the refused run's config."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = open_tracker(compose(["logger=[csv,tensorboard]"]), RunInfo(run_dir, "run", "quickstart"))
    tracker.close(ok=False)
    assert list(run_dir.iterdir()) == []

    (run_dir / "tracking").mkdir()  # a finished run's params, then a refused resume of it
    (run_dir / "tracking" / "params.json").write_text('{"train.batch_size": 256}')
    tracker = open_tracker(compose(["logger=csv", "train.batch_size=64"]), RunInfo(run_dir, "run", "quickstart"))
    tracker.close(ok=False)
    assert json.loads((run_dir / "tracking" / "params.json").read_text()) == {"train.batch_size": 256}
    assert sorted(p.name for p in (run_dir / "tracking").iterdir()) == ["params.json"]


def test_the_first_figure_starts_the_trackers_with_their_params(tmp_path):
    tracker = open_tracker(compose(["logger=csv", "train.batch_size=64"]), RunInfo(tmp_path, "run", "quickstart"))
    assert not (tmp_path / "tracking").exists()  # checked, nothing created yet
    tracker.log_metrics({"loss": 0.5}, 1)
    tracker.close(ok=True)
    assert json.loads((tmp_path / "tracking" / "params.json").read_text())["train.batch_size"] == 64
    assert (tmp_path / "tracking" / "metrics.csv").read_text().splitlines() == ["axis,step,key,value",
                                                                                "step,1,step/loss,0.5"]  # fmt: skip


def test_a_rerun_does_not_write_the_epochs_the_csv_already_holds(tmp_path):
    """The end of a run replays its whole epoch history to the trackers (a new MLflow or wandb run wants it); a run
    rerun in its folder (killed during the audit, then resumed: nothing left to train) appended every epoch again."""
    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    for more in ([], [{"epoch": 3, "loss": 1.0}]):  # the first run, then a rerun that trains one epoch more
        tracker = open_tracker(compose(["logger=csv"]), RunInfo(tmp_path, "run", "quickstart"))
        tracker.log_metrics({"loss": 0.5}, 7)
        tracker.log_history(history + more, "epoch")
        tracker.close(ok=True)
    rows = [line for line in (tmp_path / "tracking" / "metrics.csv").read_text().splitlines() if "epoch/" in line]
    assert rows == ["epoch,1,epoch/loss,2.0", "epoch,2,epoch/loss,1.5", "epoch,3,epoch/loss,1.0"]


def test_a_run_with_no_figure_still_opens_its_trackers_when_it_ends_well(tmp_path):
    open_tracker(compose(["logger=csv"]), RunInfo(tmp_path, "run", "quickstart")).close(ok=True)
    assert (tmp_path / "tracking" / "params.json").is_file()


@pytest.mark.slow  # two CLI jobs (~30 s)
def test_a_budget_refusal_leaves_no_tracking_folder(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    proc = run_cli(*FAST, "logger=csv", f"hydra.run.dir={first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_report(first)["privacy"]["budget"]["dataset_runs"] == 1
    proc = run_cli(*FAST, "logger=[csv,tensorboard,mlflow]", f"hydra.run.dir={second}")
    assert proc.returncode == 2 and "privacy budget exhausted" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in second.iterdir()) == [".aisec-train.lock", ".hydra", "cli.log"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["logger=csv", "logger.csv.path=metrics.csv"],  # replaced by the report's: every tracker row lost, exit 0
        ["logger=csv", "logger.csv.path=checkpoints/rows.csv"],
        ["logger=tensorboard", "logger.tensorboard.log_dir=model.pt"],  # a folder: the run failed at its end
    ],
)
def test_a_tracker_never_writes_over_the_runs_own_outputs(tmp_path, overrides):
    with pytest.raises(ConfigError, match=r"^logger\.\w+\.\w+: .* is not allowed: \S+ is the run's own"):
        open_tracker(compose(overrides), RunInfo(tmp_path, "run", "quickstart"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["mlartifacts", "mlflow.db"])
def test_a_multiruns_mlflow_store_is_never_written_through_a_symlink(tmp_path, name):
    """A multirun's default MLflow store lies in the sweep directory, which the run directory's symlink check never
    walks: MLflow wrote the report, model card and model.pt through a linked ``mlartifacts`` to wherever it led."""
    sweep, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    (sweep / "0").mkdir(parents=True)
    elsewhere.mkdir()
    target = elsewhere / name
    target.mkdir() if name == "mlartifacts" else target.write_bytes(b"")
    (sweep / name).symlink_to(target)
    info = RunInfo(sweep / "0", "job0", "quickstart", sweep_dir=sweep)
    with pytest.raises(IntegrityError, match=rf"^logger.mlflow: {sweep / name} is a symlink"):
        open_tracker(compose(["logger=mlflow"]), info)  # before the tracking child starts
    assert list(elsewhere.rglob("*")) == [target] and list((sweep / "0").iterdir()) == []


def test_url_credentials_never_reach_a_tracker(tmp_path):
    """The config goes to every tracker as parameters, and a tracking server shows them to everyone who reads the
    experiment: ``logger.mlflow.tracking_uri=postgresql://user:password@db/mlflow`` went there whole."""
    assert redact({"logger.mlflow.tracking_uri": "postgresql+psycopg2://mlflow:pa@ss@db:5432/mlflow"}) == {
        "logger.mlflow.tracking_uri": "postgresql+psycopg2://***@db:5432/mlflow"
    }
    assert redact({"a": "https://token@host/x", "b": "http://host:5000", "c": "/data/a@b.npz", "d": 3}) == {
        "a": "https://***@host/x", "b": "http://host:5000", "c": "/data/a@b.npz", "d": 3
    }  # fmt: skip
    cfg = compose(["logger=csv"])
    cfg.dataset.path = "https://user:s3cret@data.example/train.npz"  # any setting: the config is sent whole
    tracker = open_tracker(cfg, RunInfo(tmp_path, "run", "quickstart"))
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.close(ok=True)
    text = (tmp_path / "tracking" / "params.json").read_text()
    assert "s3cret" not in text and "https://***@data.example/train.npz" in text


def test_a_killed_tracking_child_leaves_the_run_going_and_ends_it_named_as_killed(tmp_path):
    """A tracker's child that dies mid-run (killed, its server gone) used to end the run at the next record: a DP
    run lost its model and report with its budget spent on the steps taken. Now the other trackers go on, the run
    finishes, and close (after the report and model are written) raises the failure. The failure line named
    runpy's warning about how the child was started, not the kill."""
    tracker = open_tracker(compose(["logger=[csv,tensorboard]"]), RunInfo(tmp_path, "run", "quickstart"))
    tracker.log_metrics({"loss": 1.0}, 1, "epoch")
    child = tracker.backends[1]
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait(timeout=30)
    tracker.log_metrics({"loss": 0.5}, 2, "epoch")  # no raise: the csv goes on
    tracker.log_metrics({"loss": 0.25}, 3, "epoch")
    with pytest.raises(TrackingError, match=r"^logger=tensorboard failed: its process was killed by SIGKILL"):
        tracker.close(ok=True)
    rows = (tmp_path / "tracking" / "metrics.csv").read_text().splitlines()
    assert rows[1:] == ["epoch,1,epoch/loss,1.0", "epoch,2,epoch/loss,0.5", "epoch,3,epoch/loss,0.25"]
    assert "RuntimeWarning" not in (tmp_path / "tracking" / "tensorboard.log").read_text()


def test_the_run_s_last_line_after_a_tracker_died_says_the_run_itself_finished(tmp_path):
    """Exit status 2 is a refusal's: after a tracker died mid-run the run still wrote its report and model, and the
    one line must say so, or a user reads the run as refused and trains again, spending budget twice."""
    from aisec_train.tracking import tracking

    with pytest.raises(TrackingError) as err:
        with tracking(compose(["logger=[csv,tensorboard]"]), RunInfo(tmp_path, "run", "quickstart")) as tracker:
            tracker.log_metrics({"loss": 1.0}, 1, "epoch")
            child = tracker.backends[1]
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait(timeout=30)
            tracker.log_metrics({"loss": 0.5}, 2, "epoch")
    line = str(err.value)
    assert line.startswith("logger=tensorboard failed: its process was killed by SIGKILL"), line
    assert line.endswith(f"the run itself finished: its report and model are in {tmp_path}") and "\n" not in line


def test_a_key_under_a_logger_that_is_off_is_named_in_one_line():
    """``logger.csv.path=x`` without ``logger=csv``: OmegaConf fails with a bare AssertionError (a traceback, exit
    status 1) on the logger's null node; this is the line the command line and the API answer instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def refusal(*overrides: str) -> ConfigError | None:
        return logger_off(OverridesParser.create().parse_overrides(list(overrides)))

    err = refusal("logger.csv.path=x")
    assert str(err).startswith("logger.csv.path=x is not allowed: logger csv is not on in this run; turn it on")
    assert "logger=csv" in str(err)
    assert "logger.tensorboard.log_dir=t" in str(
        refusal("logger=csv", "logger.csv.path=a", "logger.tensorboard.log_dir=t")
    )
    assert "logger.wandb.mode=online" in str(
        refusal("logger=many", "logger.mlflow.run_name=r", "logger.wandb.mode=online")
    )
    assert refusal("train.epochs=2") is None  # another failure: not the logger's to name


def test_a_key_under_a_logger_that_is_off_is_refused_in_one_line_by_the_cli_and_the_api(tmp_path):
    """``logger.csv.path=x`` without ``logger=csv`` was a traceback (OmegaConf's bare AssertionError, exit status 1)."""
    proc = run_cli("logger.csv.path=x", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "aisec-train: error: logger.csv.path=x is not allowed: logger csv is not on in this run; turn it on in the "
        "same command (logger=csv, or a list such as logger=[tensorboard,csv])"
    ]
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^logger.tensorboard.log_dir=t is not allowed: logger tensorboard is"):
        compose(["logger=csv", "logger.tensorboard.log_dir=t"])


# What a DP run's trackers get per step that the epsilon does not cover, and the words privacy.not_covered names it
# by. lr and epsilon are public (the schedule and the accountant's figure); a new per-step figure must join one.
PUBLIC_STEP_FIGURES = {"lr", "epsilon"}
LISTED_AS = {"loss": "training loss", "clip_fraction": "clip fraction"}


def test_every_per_step_figure_a_dp_tracker_gets_is_public_or_listed_as_not_covered():
    """The clip fraction (the share of a private batch's per-sample gradients over the clip norm, no noise) went to
    every tracker under DP and was listed nowhere: the report's privacy.not_covered named the loss only."""
    from aisec_train.privacy.claims import NOT_COVERED
    from aisec_train.tracking.callback import StepLogger

    class Sink:
        records: list = []

        def log_metrics(self, values, step, axis):
            self.records.append((values, step, axis))

    model = SimpleNamespace(per_sample_gradient_norms=torch.tensor([0.2, 3.0, 0.9]))  # a private step's norms
    loop = SimpleNamespace(rank=0, steps=4, base_optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.5),
                           last_loss=1.25, private=True, model=model, privacy=SimpleNamespace(max_grad_norm=1.0),
                           ledger=SimpleNamespace(epsilon=lambda: 0.7))  # fmt: skip
    sink = Sink()
    StepLogger(sink, every_n_steps=1, epsilon_every_n_steps=1).after_step(loop)
    ((values, step, axis),) = sink.records
    assert values["clip_fraction"] == pytest.approx(1 / 3) and (step, axis) == (4, "step")
    for key in set(values) - PUBLIC_STEP_FIGURES:
        assert key in LISTED_AS, f"{key}: a new per-step figure; is it covered by the epsilon? list it if not"
        assert any(LISTED_AS[key] in item and "trackers" in item for item in NOT_COVERED), key


def test_a_stale_rank_without_torchrun_s_other_variables_keeps_the_run_s_trackers(tmp_path, monkeypatch):
    """``RANK=1`` left in a shell, without WORLD_SIZE/MASTER_*, is a one-process run that charges and reports as
    rank 0; open_tracker read RANK itself and gave that run no trackers, silently."""
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    tracker = open_tracker(compose(["logger=csv", "privacy=none"]), RunInfo(tmp_path, "run", "quickstart"))
    assert tracker.backends, "rank 0's trackers were dropped for a stale RANK"
    tracker.close(ok=True)

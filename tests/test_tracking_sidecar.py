"""The tracking child process (aisec_train/tracking/sidecar.py): the training process never loads MLflow, wandb or
TensorBoard, yet every record reaches their stores by the time the tracker is closed; a child that fails ends the
run in one line; a training process that dies leaves its MLflow run marked failed, not running forever."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from aisec_train import compose
from aisec_train.errors import Refusal
from aisec_train.tracking import TrackingError, open_tracker
from aisec_train.tracking.base import RunInfo
from aisec_train.tracking.mlflow_logger import local_store
from tests.conftest import REPO

HEAVY = ("mlflow", "wandb", "tensorboard", "sqlalchemy", "alembic")

# A training process in miniature: opens the trackers, logs 50 steps and 2 epochs, the headline, then closes
# (or, with "die", exits without closing). Prints which heavy packages it loaded.
SCRIPT = """
import os, sys, time
from pathlib import Path
from aisec_train import compose
from aisec_train.tracking import open_tracker
from aisec_train.tracking.base import RunInfo
HEAVY = __HEAVY__
run_dir = Path(sys.argv[1])
tracker = open_tracker(compose(["logger=[csv,tensorboard,mlflow,wandb]"]), RunInfo(run_dir, "r", "quickstart"))
for step in range(1, 51):
    if step == 26:
        time.sleep(1.5)  # a slow step: its records must say when training logged them, not when the child wrote
    tracker.log_metrics({"loss": 1.0 / step, "epsilon": 0.01 * step}, step)
tracker.log_history([{"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.75}], "epoch")
print(sorted(m for m in HEAVY if m in sys.modules), flush=True)
if sys.argv[2] == "die":
    os._exit(3)
tracker.finish({"metrics.clean_accuracy": 0.75}, {})
tracker.close(ok=True)
print(sorted(m for m in HEAVY if m in sys.modules))
"""


def training_process(run_dir: Path, how: str) -> subprocess.CompletedProcess:
    script = SCRIPT.replace("__HEAVY__", repr(HEAVY))
    return subprocess.run([sys.executable, "-c", script, str(run_dir), how], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    return client, run


@pytest.mark.slow  # a fresh interpreter plus three tracking children (~15 s quiet); test_tracking.py's CLI job covers
def test_trackers_run_outside_the_training_process_and_every_record_arrives(tmp_path):  # the stores read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = training_process(run_dir, "close")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["[]", "[]"]  # neither while training nor at close
    client, run = mlflow_run(run_dir)  # close returned: the child had written everything
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "step/loss")
    assert [m.step for m in losses] == list(range(1, 51))
    assert losses[25].timestamp - losses[24].timestamp >= 1400  # stamped by the training process, not the child
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch/test_accuracy")] == [0.5, 0.75]
    assert run.data.metrics["final/metrics.clean_accuracy"] == 0.75
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    epsilons = events.Scalars("step/epsilon")
    assert [e.step for e in epsilons] == list(range(1, 51))
    assert epsilons[25].wall_time - epsilons[24].wall_time >= 1.4
    hparams = events.PluginTagToContent("hparams")  # the HParams tab's three records
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams)
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


@pytest.mark.slow  # a fresh interpreter plus three tracking children, then waits for the orphans
def test_a_killed_training_process_leaves_its_mlflow_run_failed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = training_process(run_dir, "die")
    assert proc.returncode == 3, proc.stderr[-3000:]
    deadline, run = time.monotonic() + 300, None  # the orphaned child drains its input, then closes the run
    while time.monotonic() < deadline:
        if (run_dir / "mlflow.db").exists():
            client, run = mlflow_run(run_dir)
            if run.info.status != "RUNNING":
                break
        time.sleep(1)
    assert run is not None and run.info.status == "FAILED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step/loss")]
    assert steps == list(range(1, len(steps) + 1))  # what reached the child before the kill, in order, no gap


# A store that fails only in the tracking child: an unknown scheme and (MLflow >= 3.13) a file store are refused
# before the child starts (tests/test_reach_edges.py), but an SQLite database under a plain file (no folder can be
# made there) only fails when MLflow opens it.
FAILING_STORE = "logger.mlflow.tracking_uri=sqlite:///{}/a_file/mlflow.db"


def test_a_failing_tracker_ends_the_run_in_one_line_with_its_output_kept(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    cfg = compose(["logger=mlflow", FAILING_STORE.format(tmp_path)])
    tracker = open_tracker(cfg, RunInfo(tmp_path, "r", "quickstart"))  # returns at once: the child starts aside
    with pytest.raises(TrackingError, match=r"^logger=mlflow failed: .*its whole output: ") as err:
        tracker.close(ok=True)
    assert "\n" not in str(err.value)
    assert "Traceback" in (tmp_path / "tracking" / "mlflow.log").read_text()
    assert issubclass(TrackingError, Refusal)  # the command line answers it in one line, exit status 2


def test_a_failing_tracker_does_not_hide_the_runs_own_error(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    cfg = compose(["logger=mlflow", FAILING_STORE.format(tmp_path)])
    tracker = open_tracker(cfg, RunInfo(tmp_path, "r", "quickstart"))
    tracker.log_metrics({"loss": 1.0}, 1, "epoch")  # a first figure: the store opens (and fails) in the child
    tracker.close(ok=False)  # the run is already failing: its error is the one raised, not the tracker's
    assert (tmp_path / "tracking" / "mlflow.log").is_file()


def test_a_new_mlflow_store_is_a_copy_of_the_cached_empty_one(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = local_store(tmp_path / "mlflow.db", tmp_path / "mlartifacts")
    client = MlflowClient(uri)  # opens without migrating: the schema is the installed version's
    (default,) = client.search_experiments()
    assert default.name == "Default" and default.artifact_location == str(tmp_path / "mlartifacts" / "0")
    client.create_experiment("kept")
    assert local_store(tmp_path / "mlflow.db", tmp_path / "mlartifacts") == uri  # an existing store is never replaced
    assert MlflowClient(uri).get_experiment_by_name("kept") is not None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staged copy left behind


def test_the_tracker_child_runs_with_mlflow_telemetry_off_and_one_thread():
    # MLflow's telemetry writes ~/.config/mlflow and calls out from cluster nodes; the child must not.
    from aisec_train.tracking.sidecar import CHILD_ENV

    assert CHILD_ENV["MLFLOW_DISABLE_TELEMETRY"] == "true" and CHILD_ENV["OMP_NUM_THREADS"] == "1"

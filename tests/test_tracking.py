"""Experiment tracking (logger group): a real job fans out to CSV, TensorBoard, MLflow and wandb (offline), and
each store is read back with its own reader: TensorBoard's EventAccumulator, MLflow's client, wandb's record
protobufs."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from aisec_train import compose
from aisec_train.errors import ConfigError
from aisec_train.tracking import BACKENDS, check_installed, open_tracker
from aisec_train.tracking.base import RunInfo, flatten
from tests.conftest import read_report, run_cli

FAST = ("experiment=smoke", "audit=off", "robustness.evaluate=false")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    proc = run_cli(*FAST, "logger=[csv,tensorboard,mlflow,wandb]", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb:" not in proc.stdout  # wandb is silent: the job's own summary is the last thing printed
    return run_dir


def test_tensorboard_events_read_back(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = read_report(tracked)
    events = EventAccumulator(str(tracked / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("step/loss")]
    assert steps == list(range(1, report["privacy"]["steps"] + 1))  # every optimizer step, in order
    # Epsilon on the step axis at each epoch's last step (logger.epsilon_every_n_steps=0): the epoch row's figure
    epsilons = events.Scalars("step/epsilon")
    assert len(epsilons) == report["train"]["epochs_completed"] and epsilons[-1].step == report["privacy"]["steps"]
    values = [e.value for e in epsilons]
    assert values == sorted(values) and values[-1] == pytest.approx(report["privacy"]["epsilon"], rel=1e-5)
    assert values == pytest.approx([e.value for e in events.Scalars("epoch/epsilon")], rel=1e-6)
    assert len(events.Scalars("epoch/test_accuracy")) == report["train"]["epochs_completed"]
    final = events.Scalars("final/metrics.clean_accuracy")[0].value
    assert final == pytest.approx(report["metrics"]["clean_accuracy"], rel=1e-6)
    assert all(0 <= e.value <= 1 for e in events.Scalars("step/clip_fraction"))
    assert "config/text_summary" in events.Tags()["tensors"]  # the flattened config as a text table


def test_mlflow_store_read_back(tracked):
    from mlflow.tracking import MlflowClient

    report = read_report(tracked)
    client = MlflowClient(f"sqlite:///{tracked.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")  # the Hydra experiment preset names a single run's
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3" and run.data.params["privacy.mode"] == "dpsgd"
    assert run.data.metrics["final/privacy.epsilon"] == pytest.approx(report["privacy"]["epsilon"])
    history = client.get_metric_history(run.info.run_id, "step/loss")
    assert [m.step for m in history] == list(range(1, report["privacy"]["steps"] + 1))
    lrs = {m.value for m in client.get_metric_history(run.info.run_id, "step/lr")}
    assert lrs == {float(run.data.params["train.lr"])}  # no scheduler: the configured rate at every step
    fractions = client.get_metric_history(run.info.run_id, "step/clip_fraction")
    assert len(fractions) == report["privacy"]["steps"] and all(0 <= m.value <= 1 for m in fractions)
    accuracy = client.get_metric_history(run.info.run_id, "epoch/test_accuracy")
    assert [m.step for m in accuracy] == list(range(1, report["train"]["epochs_completed"] + 1))
    # the headline numbers, from several sections, and the checklist's tallies
    final = run.data.metrics
    assert final["final/privacy.delta"] == pytest.approx(report["privacy"]["delta"])
    assert final["final/train.epochs_completed"] == report["train"]["epochs_completed"]
    assert final["final/metrics.clean_accuracy"] == pytest.approx(report["metrics"]["clean_accuracy"])
    passed = sum(1 for item in report["checklist"] if item["status"] == "pass")
    assert final["final/checklist.pass"] == passed > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "model_card.md", "security_report.md", "metrics.csv", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    local = Path(client.download_artifacts(run.info.run_id, "report.json", str(tracked / "dl")))
    assert json.loads(local.read_text())["privacy"]["epsilon"] == report["privacy"]["epsilon"]


def wandb_records(path: Path):
    """The records of an offline ``run-*.wandb`` file, parsed with wandb's own protobuf schema. The container is
    LevelDB's log format (7-byte file header, 32 KiB blocks of chunks ``crc32 u32, length u16, type u8``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb stores "step/loss" as the nested key ["step", "loss"]


def test_wandb_offline_run_read_back(tracked):
    report = read_report(tracked)
    (run_file,) = (tracked / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    steps = [h["step"] for h in history if "step/loss" in h]
    assert steps == list(range(1, report["privacy"]["steps"] + 1))
    epochs = [h for h in history if "epoch/test_accuracy" in h]
    assert [h["epoch"] for h in epochs] == list(range(1, report["train"]["epochs_completed"] + 1))
    config = {u.key for r in records if r.HasField("config") for u in r.config.update}
    assert {"train.lr", "privacy.target_epsilon", "logger.wandb.mode"} <= config
    summary = {key(u): json.loads(u.value_json) for r in records if r.HasField("summary") for u in r.summary.update}
    assert summary["final/metrics.clean_accuracy"] == pytest.approx(report["metrics"]["clean_accuracy"])
    assert not [p for p in tracked.rglob("*") if p.is_symlink()]  # a resume would refuse a link in the run dir


def test_csv_rows_and_params(tracked):
    report = read_report(tracked)
    rows = list(csv.DictReader((tracked / "tracking" / "metrics.csv").open()))
    eps = [float(r["value"]) for r in rows if r["key"] == "step/epsilon"]
    assert len(eps) == report["train"]["epochs_completed"] and eps[-1] == pytest.approx(report["privacy"]["epsilon"])
    final = {r["key"]: float(r["value"]) for r in rows if r["axis"] == "final"}
    assert final["final/metrics.clean_accuracy"] == pytest.approx(report["metrics"]["clean_accuracy"])
    assert json.loads((tracked / "tracking" / "params.json").read_text())["train.epochs"] == 3


def test_epsilon_every_step_on_request(tmp_path):
    """``logger.epsilon_every_n_steps=1``: the exact epsilon after every optimizer step, rising to the report's;
    each is an accountant call, so the default logs it only at each epoch's last step (docs/cluster.md)."""
    run_dir = tmp_path / "run"
    proc = run_cli(*FAST, "logger=csv", "logger.epsilon_every_n_steps=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(run_dir)
    rows = [r for r in csv.DictReader((run_dir / "tracking" / "metrics.csv").open()) if r["key"] == "step/epsilon"]
    assert [int(r["step"]) for r in rows] == list(range(1, report["privacy"]["steps"] + 1))
    eps = [float(r["value"]) for r in rows]
    assert eps == sorted(eps) and eps[0] > 0 and eps[-1] == pytest.approx(report["privacy"]["epsilon"])


def test_multirun_jobs_are_one_mlflow_experiment_and_one_wandb_group(tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m", *FAST, "privacy=none", "train.epochs=1", "logger=[mlflow,wandb]", "train.seed=0,1",
        f"hydra.sweep.dir={sweep}", "hydra.callbacks={}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{sweep.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(str(sweep))
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1"]
    assert sorted(r.data.params["train.seed"] for r in runs) == ["0", "1"]
    groups = {}
    for run_file in sweep.glob("*/wandb/offline-run-*/run-*.wandb"):
        (run,) = [r.run for r in wandb_records(run_file) if r.HasField("run")][:1]
        groups[run.display_name] = run.run_group
    assert groups == {"job0": str(sweep), "job1": str(sweep)}


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    cfg = compose(["logger=[csv,tensorboard]"])
    tracker = open_tracker(cfg, RunInfo(tmp_path, "r", "quickstart"), rank=1)
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.close(ok=True)
    assert not tracker and list(tmp_path.iterdir()) == []
    # under torchrun the rank comes from the environment (all of torchrun's env:// variables: RANK alone is a stale
    # shell's, a one-process run that reports as rank 0; tests/test_tracking_trust.py)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29512")):
        monkeypatch.setenv(name, value)
    assert not open_tracker(cfg, RunInfo(tmp_path, "r", "quickstart"))


def test_missing_package_refused_in_one_line(monkeypatch):
    module, cls, _, where = BACKENDS["wandb"]
    monkeypatch.setitem(BACKENDS, "wandb", (module, cls, "wandb_package_that_is_not_installed", where))
    with pytest.raises(ConfigError, match=r"^logger=wandb is not allowed: the wandb_package_that_is_not_installed"):
        check_installed(compose(["logger=wandb"]))


def test_logger_choices_compose():
    assert compose(["logger=many"]).logger.enabled() == ["csv", "tensorboard", "mlflow"]
    assert compose(["logger=[tensorboard,wandb]"]).logger.enabled() == ["tensorboard", "wandb"]
    assert compose([]).logger.enabled() == []
    with pytest.raises(ConfigError, match="logger.every_n_steps=0 is not allowed"):
        compose(["logger.every_n_steps=0"])
    with pytest.raises(ConfigError, match=r"logger.epsilon_every_n_steps=-1 is not allowed: must be >= 0"):
        compose(["logger.epsilon_every_n_steps=-1"])
    flat = flatten(compose(["logger=csv"]))
    assert flat["privacy.mode"] == "dpsgd" and flat["logger.csv.path"] == "tracking/metrics.csv"

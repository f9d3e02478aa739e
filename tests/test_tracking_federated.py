"""A federated run is tracked per round, live: a real Flower simulation with logger=[csv,tensorboard,mlflow] and
record-level DP. Each round reaches the trackers as the server completes it, not at the federation's end: the test
watches the csv file while the job runs, and reads the rounds' timestamps back with MLflow's client and
TensorBoard's EventAccumulator; values are checked against the report's per-round table."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_report

ROUNDS = 2


def watch_rounds(path: Path, stop: threading.Event, seen: dict[int, float]) -> None:
    """When each round's test accuracy first appears in the csv tracker's file (read with the csv module)."""
    while not stop.is_set():
        if path.exists():
            with path.open(newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("key") == "round/test_accuracy" and row["step"].isdigit():
                        seen.setdefault(int(row["step"]), time.monotonic())
        stop.wait(0.1)


@pytest.mark.slow  # a real Flower simulation (Ray), 2 clients, 2 rounds of 4 local epochs: about 2 min
def test_a_federated_run_is_logged_per_round_as_each_round_completes(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    args = [
        # Rounds of a few seconds (a quiet CI machine did round 2 of 600 samples, 1 local epoch in 0.41 s): the
        # live check below tells rounds apart by when they reach the trackers, which needs rounds longer than
        # the watcher's 0.1 s poll and the trackers' own latency.
        "federated=fedavg", "dataset=synthetic", "dataset.n_samples=1200", "federated.clients=2",
        "federated.min_clients=2", f"federated.rounds={ROUNDS}", "federated.local_epochs=4",
        "federated.ray_num_cpus=2", "audit=off", "robustness.evaluate=false",
        "logger=[csv,tensorboard,mlflow]", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "AISEC_TRAIN_LEDGER_STORE": str(tmp_path / "l")}  # fmt: skip
    env.pop("HYDRA_FULL_ERROR", None)
    seen: dict[int, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_rounds, args=(run_dir / "tracking" / "metrics.csv", stop, seen))
    watcher.start()
    try:
        with (tmp_path / "out.txt").open("w") as out:
            proc = subprocess.run([sys.executable, "-m", "aisec_train", *args], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=900)  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, (tmp_path / "out.txt").read_text()[-3000:]
    report = read_report(run_dir)
    per_round = report["federated"]["per_round"]
    assert [r["round"] for r in per_round] == [1, 2]
    round_two_s = per_round[1]["round_s"]  # the server's own timing of round 2 (train + evaluate)
    assert round_two_s > 0.5, f"round 2 took {round_two_s:.2f} s: too short to tell live logging from a replay"

    # Live: round 1's row was in the csv while round 2 was still running (logged at the federation's end, both
    # rows would appear in the same poll).
    assert sorted(seen) == [1, 2]
    assert seen[2] - seen[1] >= 0.5 * round_two_s

    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    accuracy = client.get_metric_history(run.info.run_id, "round/test_accuracy")
    assert [m.step for m in accuracy] == [1, 2]
    assert [m.value for m in accuracy] == pytest.approx([r["test_accuracy"] for r in per_round])
    assert (accuracy[1].timestamp - accuracy[0].timestamp) / 1000 >= 0.5 * round_two_s  # stamped as measured
    assert accuracy[1].timestamp <= run.info.end_time
    history = {key: client.get_metric_history(run.info.run_id, f"round/{key}")
               for key in ("loss", "epsilon", "sampled", "accepted", "round_s")}  # fmt: skip
    assert all([m.step for m in rows] == [1, 2] for rows in history.values())
    assert [m.value for m in history["sampled"]] == [r["sampled"] for r in per_round]
    assert [m.value for m in history["accepted"]] == [len(r["accepted"]) for r in per_round]
    epsilons = [m.value for m in history["epsilon"]]  # record-level DP: the clients' spend after each round
    assert 0 < epsilons[0] < epsilons[1] == pytest.approx(report["privacy"]["epsilon"], rel=1e-6)
    assert history["round_s"][1].value == pytest.approx(round_two_s, rel=0.05, abs=0.5)
    assert run.data.params["federated.rounds"] == str(ROUNDS)
    assert run.data.metrics["final/metrics.clean_accuracy"] == pytest.approx(report["metrics"]["clean_accuracy"])

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("round/test_accuracy")
    assert [e.step for e in scalars] == [1, 2]
    assert scalars[1].wall_time - scalars[0].wall_time >= 0.5 * round_two_s

    rows = list(csv.DictReader((run_dir / "tracking" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["key"] == "round/test_accuracy"] == [1, 2]  # once each: no replay


def test_a_round_row_becomes_the_trackers_round_metrics():
    """The strategy's history row as the trackers get it live: client-level epsilon replaces the clients' own, the
    refused client's loss is left out, and an unevaluated round has no test accuracy (NaN is dropped)."""
    from aisec_train.federated.report import round_metrics
    from aisec_train.tracking.base import Tracker

    row = {"round": 3, "sampled": 3, "dropped": 1, "accepted": [0], "refused": [{"client": 2}], "failed": None,
           "clients": [{"train_loss": 0.5, "train_accuracy": 0.8, "epsilon": 0.0},
                       {"train_loss": 9.0, "refused": 1, "epsilon": 0.0}]}  # fmt: skip
    values = round_metrics(row, 1.25, 4.0)
    assert values["loss"] == 0.5 and values["train_accuracy"] == 0.8 and values["epsilon"] == 1.25
    assert (values["sampled"], values["accepted"], values["dropped"], values["refused"]) == (3, 1, 1, 1)
    assert values["failed"] == 0.0 and values["round_s"] == 4.0
    assert round_metrics({**row, "failed": "quorum"}, None, 4.0)["epsilon"] == 0.0  # record level: the clients'

    class Sink:
        name, records = "sink", []

        def log_metrics(self, values, step, axis):
            self.records.append((sorted(values), step, axis))

    sink = Sink()
    tracker = Tracker([sink])
    tracker.log_metrics(values, 3, "round")
    assert sink.records[0][1:] == (3, "round") and "round/test_accuracy" not in sink.records[0][0]
    tracker.log_history([{"epoch": 3, "test_accuracy": 0.9}, {"epoch": 4, "test_accuracy": 0.91}], "round")
    assert [step for _, step, _ in sink.records] == [3, 4]  # the end-of-run replay skips the round logged live

"""A federated run is tracked per round: a real Flower simulation with logger=[csv,mlflow], read back with MLflow's
client against the report's per-round table."""

from __future__ import annotations

import csv

import pytest

from tests.conftest import read_report, run_cli


@pytest.mark.slow  # a real Flower simulation (Ray), 2 rounds: about 2 min
def test_a_federated_run_is_logged_per_round(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    proc = run_cli(
        "federated=fedavg", "dataset=synthetic", "dataset.n_samples=600", "privacy=none", "federated.clients=2",
        "federated.min_clients=2", "federated.rounds=2", "federated.local_epochs=1", "federated.ray_num_cpus=2",
        "audit=off", "robustness.evaluate=false", "logger=[csv,mlflow]", f"hydra.run.dir={run_dir}",
        env={"AISEC_TRAIN_LEDGER_STORE": str(tmp_path / "l")}, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(run_dir)
    per_round = report["federated"]["per_round"]
    assert [r["round"] for r in per_round] == [1, 2]
    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    accuracy = client.get_metric_history(run.info.run_id, "round/test_accuracy")
    assert [m.step for m in accuracy] == [1, 2]
    assert [m.value for m in accuracy] == pytest.approx([r["test_accuracy"] for r in per_round])
    assert {m.step for m in client.get_metric_history(run.info.run_id, "round/loss")} == {1, 2}
    assert run.data.params["federated.rounds"] == "2"
    assert run.data.metrics["final/metrics.clean_accuracy"] == pytest.approx(report["metrics"]["clean_accuracy"])
    rows = list(csv.DictReader((run_dir / "tracking" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["key"] == "round/test_accuracy"] == [1, 2]

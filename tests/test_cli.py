"""The real command line, end to end: `aisec-train experiment=smoke`, resume, refusal and multirun."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from opacus.accountants import create_accountant

from aisec_train.data.dataset import sha256_file
from tests.conftest import dig, read_report, run_cli

BRIEF_KEYS = [
    "data.manifest_sha256",
    "data.n_train",
    "data.n_test",
    "metrics.clean_accuracy",
    "privacy.epsilon",
    "privacy.delta",
    "privacy.noise_multiplier",
    "privacy.sample_rate",
    "privacy.steps",
    "privacy.accountant",
    "robustness.robust_accuracy",
    "robustness.attack",
]


def test_smoke_run_writes_the_contract(smoke_run):
    report = read_report(smoke_run)
    for key in BRIEF_KEYS:
        assert dig(report, key) is not None, key
    assert report["data"]["n_train"] == 1437 and report["data"]["n_test"] == 360
    assert set(report["robustness"]["attack"]) == {"name", "norm", "eps", "step_size", "steps", "restarts"}
    assert 0.0 <= report["robustness"]["robust_accuracy"] <= report["metrics"]["clean_accuracy"]
    assert report["privacy"]["epsilon"] <= 3.0 and report["privacy"]["accountant"] == "prv"
    items = {(c["area"], c["status"]) for c in report["checklist"]}
    assert ("training", "pass") in items and all(c["evidence"] for c in report["checklist"])
    # the model beside the report, and its hash
    assert sha256_file(smoke_run / "model.pt") == report["model"]["sha256"]
    assert (smoke_run / "model.pt.sha256").read_text().split()[0] == report["model"]["sha256"]
    card = (smoke_run / "model_card.md").read_text()
    assert report["data"]["manifest_sha256"] in card and "differential privacy" in card
    rows = list(csv.DictReader(open(smoke_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and float(rows[-1]["epsilon"]) > float(rows[0]["epsilon"])
    assert (smoke_run / "training_curve.png").stat().st_size > 1000


def test_reported_epsilon_is_opacus_epsilon_for_the_recorded_steps(smoke_run):
    privacy = read_report(smoke_run)["privacy"]
    accountant = create_accountant("prv")
    for _ in range(privacy["steps"]):
        accountant.step(noise_multiplier=privacy["noise_multiplier"], sample_rate=privacy["sample_rate"])
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta=privacy["delta"]), rel=1e-6)


def test_rerun_resumes_and_a_spent_budget_refuses_without_losing_anything(smoke_run):
    before = read_report(smoke_run)
    proc = run_cli("experiment=smoke", f"hydra.run.dir={smoke_run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = read_report(smoke_run)
    assert after["train"]["resumed_from_epoch"] == 3 and after["train"]["steps_lost_before_resume"] == 0
    assert after["privacy"]["steps"] == before["privacy"]["steps"]  # nothing retrained, epsilon not reset
    assert after["privacy"]["epsilon"] == pytest.approx(before["privacy"]["epsilon"])

    ckpt = smoke_run / "checkpoints" / "last.pt"
    ckpt_hash, report_bytes = sha256_file(ckpt), (smoke_run / "report.json").read_bytes()
    proc = run_cli("experiment=smoke", "train.epochs=6", f"hydra.run.dir={smoke_run}")
    assert proc.returncode == 2
    assert "privacy budget exhausted" in proc.stderr.strip().splitlines()[-1]
    assert sha256_file(ckpt) == ckpt_hash and (smoke_run / "report.json").read_bytes() == report_bytes


def test_tampered_checkpoint_stops_the_resume(tmp_path, smoke_run):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run, run_dir)
    ckpt = run_dir / "checkpoints" / "last.pt"
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0x01
    ckpt.write_bytes(bytes(data))
    proc = run_cli("experiment=smoke", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "refusing a tampered file" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # ~40 s of CPU: two jobs through Hydra's submitit launcher (the local executor)
def test_multirun_through_the_submitit_launcher_writes_a_sweep_summary(tmp_path):
    # hydra/launcher=local is configs/hydra/launcher/local.yaml: the submitit launcher that slurm.yaml also uses,
    # running each sweep point as a local job.
    proc = run_cli(
        "-m",
        "hydra/launcher=local",
        "experiment=smoke",
        "train.epochs=2",
        "audit=off",
        "robustness.evaluate=false",
        "privacy.target_epsilon=1,8",
        # Two models on the same data: each has its own guarantee (run scope, said in the report); the sweep's
        # jobs take the dataset ledger's lock in turn, and the one that takes the data past the other's target
        # does so on record (privacy.budget_reason).
        "privacy.budget_scope=run",
        "privacy.budget_reason='one sweep, two models'",
        "train.lock_wait_s=600",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    eps = [read_report(tmp_path / str(i))["privacy"]["epsilon"] for i in (0, 1)]
    assert eps[0] <= 1.0 < eps[1] <= 8.0
    assert (tmp_path / ".submitit").is_dir()  # the jobs really went through submitit
    rows = list(csv.DictReader(open(tmp_path / "sweep_summary.csv")))
    assert [float(r["epsilon"]) for r in rows] == pytest.approx(eps)
    assert "privacy.target_epsilon=8" in rows[1]["overrides"]
    assert (tmp_path / "sweep_summary.png").stat().st_size > 1000
    assert "| 1 |" in (tmp_path / "sweep_summary.md").read_text()

    # The command rebuilds the same summary; a missing directory is one line and exit 2.
    (tmp_path / "sweep_summary.csv").unlink()
    sweep_cli = [sys.executable, "-c", "from aisec_train.sweep import main; main()"]
    rebuilt = subprocess.run([*sweep_cli, str(tmp_path)], capture_output=True, text=True)
    assert rebuilt.returncode == 0 and list(csv.DictReader(open(tmp_path / "sweep_summary.csv"))) == rows
    missing = subprocess.run([*sweep_cli, str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr

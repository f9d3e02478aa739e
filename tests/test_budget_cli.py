"""Issue 20 items 3 and 5 through the real command lines (``aisec-train``, ``aisec-train-ledger``): a spent dataset
is not bypassed by ``budget_scope=run``, refusals are listed, a budget stop is shown, the store is per user and not
per working directory, a scratch store is marked. Each CLI run takes ~15 s of CPU: marked slow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import LEDGER_ENV, read_report, run_cli

pytestmark = pytest.mark.slow
QUICK = ("experiment=smoke", "train.epochs=1", "audit=off", "robustness.evaluate=false")


def ledger(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "aisec_train.privacy.ledger_cli", *args], capture_output=True, text=True,
        env={**os.environ, **env},
    )  # fmt: skip


def one_line_refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def spent(tmp_path_factory):
    """The default job's budget on digits, spent by one run (its own store)."""
    root = tmp_path_factory.mktemp("spent")
    env = {LEDGER_ENV: str(root / "team")}
    proc = run_cli(*QUICK, f"hydra.run.dir={root / 'first'}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, env, read_report(root / "first")["data"]["manifest_sha256"]


def test_budget_scope_run_past_the_target_needs_a_recorded_reason(spent):
    root, env, dataset = spent
    big = ("privacy.budget_scope=run", "privacy.target_epsilon=50")
    line = one_line_refusal(run_cli(*QUICK, *big, f"hydra.run.dir={root / 'big'}", env=env))
    assert "privacy.budget_scope=run still charges dataset" in line and "past the dataset's target 3.0" in line
    assert "privacy.budget_reason=TEXT" in line and f"raise-target {dataset}" in line and "privacy=none" in line
    assert not (root / "big" / "model.pt").exists()

    shown = ledger("show", dataset[:16], env=env)  # the short hash the refusal prints
    assert shown.returncode == 0 and f"refused run {root / 'big'} at " in shown.stdout
    assert f"run {root / 'big'}  started" not in shown.stdout  # a refusal, not a run of 0 steps

    why = "privacy.budget_reason='threat-model study, ticket 9'"
    proc = run_cli(*QUICK, *big, why, f"hydra.run.dir={root / 'big'}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    budget = read_report(root / "big")["privacy"]["budget"]
    assert budget["dataset_exceeded"] and budget["dataset_epsilon"] > 3.0
    assert budget["dataset_exceeds"][0]["why"] == "threat-model study, ticket 9"
    card = (root / "big" / "model_card.md").read_text()
    assert f"**The records' total spend:** epsilon {budget['dataset_epsilon']:.3f} of the dataset's target 3.0" in card
    assert "**Target passed on record:**" in card and "threat-model study, ticket 9" in card
    shown = ledger("show", dataset[:16], env=env).stdout
    assert f"target passed by run {root / 'big'}" in shown and ": threat-model study, ticket 9" in shown


def test_a_scratch_store_is_marked_as_not_the_team_s_ledger(spent):
    root, env, _ = spent
    proc = run_cli(*QUICK, "privacy.ledger_store=scratch", f"hydra.run.dir={root / 'scratch'}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    privacy = read_report(root / "scratch")["privacy"]
    assert privacy["ledger_scratch"] and "scratch_ledgers" in privacy["ledger_store"]
    assert "**not the team's ledger**" in (root / "scratch" / "model_card.md").read_text()


def test_a_budget_stop_is_shown_on_the_console_card_and_security_report(tmp_path):
    stop = ("privacy.noise_multiplier=2.0", "privacy.target_epsilon=3", "train.epochs=6")  # ~18 steps do not fit
    proc = run_cli(*QUICK, *stop, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_report(tmp_path / "run")["train"]["stopped_by_budget"]
    assert "training was stopped by the privacy budget after" in proc.stderr + proc.stdout
    assert "**Stopped by the budget:**" in (tmp_path / "run" / "model_card.md").read_text()
    assert "**Stopped by the budget:**" in (tmp_path / "run" / "security_report.md").read_text()


def test_the_store_does_not_follow_the_working_directory(tmp_path):
    env = {LEDGER_ENV: "", "XDG_DATA_HOME": str(tmp_path / "home-data")}  # the user's default store
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = run_cli(*QUICK, f"hydra.run.dir={tmp_path / 'r1'}", cwd=tmp_path / "a", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    store = read_report(tmp_path / "r1")["privacy"]["ledger_store"]
    assert store == str(tmp_path / "home-data" / "aisec-train" / "privacy_ledgers")
    line = one_line_refusal(run_cli(*QUICK, f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path / "b", env=env))
    assert "privacy budget exhausted for dataset" in line  # the same budget, from another directory
    assert not (tmp_path / "a" / "outputs").exists() and not (tmp_path / "b" / "outputs").exists()

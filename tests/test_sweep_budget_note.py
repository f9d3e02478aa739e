"""A sweep of several DP jobs on one dataset's budget is told so before its first job trains (cli.check_multirun).

Whether the later jobs fit depends on the ledger and on what the earlier jobs spend, so it is a note on stderr,
not a refusal; the jobs are composed and checked, nothing trains here."""

from __future__ import annotations

import pytest

from aisec_train import cli
from aisec_train.config import register_configs

BASE = ["experiment=smoke", "audit=off", "robustness.evaluate=false"]


def sweep_note(capsys, tmp_path, *overrides: str) -> str:
    register_configs()
    args = cli.check_flags(["-m", *BASE, *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    cli.check_multirun(args)
    assert not (tmp_path / "sweep").exists()  # checked only: no job ran
    return capsys.readouterr().err


def test_dp_jobs_on_one_dataset_get_the_note(capsys, tmp_path):
    err = sweep_note(capsys, tmp_path, "privacy.target_epsilon=1,2")
    assert "note: multirun job 0 (privacy.target_epsilon=1) and 1 later job(s) are DP runs charged" in err, err
    assert "privacy.budget_scope=run" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides",
    [
        ["privacy=none", "train.lr=0.1,0.2"],
        ["privacy.budget_scope=run", "privacy.target_epsilon=1,2"],
        ["privacy.fit_to_budget=true", "privacy.target_epsilon=1,2"],
        ["privacy.ledger_store=scratch", "privacy.target_epsilon=1,2"],
        ["privacy.target_epsilon=1"],  # one DP job
    ],
)
def test_no_note_when_the_jobs_do_not_share_a_budget(capsys, tmp_path, overrides):
    assert "note:" not in sweep_note(capsys, tmp_path, *overrides)

"""Command-line leftovers: a sweep of several DP jobs on one dataset's budget is told so before its first job trains
(cli.check_multirun; whether the later jobs fit depends on the ledger and on what the earlier jobs spend, so it is
a note on stderr, not a refusal; the jobs are composed and checked, nothing trains here); a closed pipe is no
refusal; an unknown group option is named against the group's real options."""

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


@pytest.mark.parametrize("argv", [["aisec-train-registry", "list"], ["aisec-train-ledger", "list"]])
def test_a_closed_pipe_is_no_refusal(tmp_path, keyed, argv):
    """`aisec-train-ledger list | head -0` printed "error: [Errno 32] Broken pipe" and exited 2, as if refused."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = os.environ | {
        "AISEC_TRAIN_REGISTRY": str(tmp_path / "registry.json"),
        "AISEC_TRAIN_LEDGER_STORE": str(tmp_path / "store"),
    }
    from aisec_train.store.keys import current_key

    current_key()  # creates the test's key file, as a first run would
    (tmp_path / "store").mkdir()
    tool = Path(sys.executable).with_name(argv[0])
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    done = subprocess.run([str(tool), *argv[1:]], stdout=write, stderr=subprocess.PIPE, text=True, env=env)
    os.close(write)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr)


@pytest.mark.parametrize("option", ["nonexistent", "_finetune"])
def test_an_unknown_group_option_lists_the_real_options_only(tmp_path, option):
    from tests.fuzzing import call_cli

    code, err, crash = call_cli([f"model={option}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and not crash, (code, err, crash)
    assert f"model={option} is not allowed: config group model takes one of cnn, hf, mlp" in err, err
    assert "_finetune," not in err and not (tmp_path / "run").exists()


def test_a_user_config_dir_keeps_its_own_options():
    from aisec_train.cli import packaged_only

    args = cli.check_flags(["--config-dir", "/somewhere", "model=mine"])
    assert not packaged_only(args)
    assert not packaged_only(cli.check_flags(["hydra.searchpath=[pkg://mine]", "model=mine"]))
    assert packaged_only(cli.check_flags(["model=cnn"]))


def test_a_ckks_run_without_an_aggregated_round_is_not_told_to_use_ckks():
    """A CKKS run whose rounds all failed was told 'aisec-train federated=fedavg_he' (what it already ran)."""
    from aisec_train.federated.report import ckks_fix
    from aisec_train.report.criteria import CRITERIA

    item = "aggregation server never sees a client update (encrypted aggregation)"
    assert ckks_fix(0, False).startswith("no round aggregated an update") and "federated=fedavg_he" not in ckks_fix(
        0, False
    )
    assert ckks_fix(5, False).startswith("report a bug") and ckks_fix(5, True) is None
    assert "fedavg_he" in CRITERIA[item].fix  # the plaintext run's fix stays the default


def test_the_uncovered_defence_data_fix_points_to_a_set_outside_the_training_data():
    """It said 'drop backdoor.trusted_path', which is what made the reserve come from the DP-trained split."""
    from aisec_train.report.criteria import CRITERIA

    fix = CRITERIA["defence data covered by the privacy claim"].fix
    assert fix.startswith("give the defence its own clean set outside the training data, backdoor.trusted_path=")
    assert "drop backdoor.trusted_path" not in fix


@pytest.mark.parametrize("override", ["dataset.channels_last=2", "robustness.evaluate=5", "train.keep_freed_memory=-1"])
def test_a_bool_setting_refuses_a_number_other_than_0_or_1(tmp_path, override):
    """OmegaConf turned any nonzero number into true: dataset.channels_last=2 trained as true."""
    from tests.fuzzing import call_cli

    code, err, crash = call_cli([override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and not crash, (code, err, crash)
    assert f"{override} is not allowed: {override.split('=')[0]} takes true or false" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["audit.privacy_audit=on", "robustness.evaluate=0", "privacy.fit_to_budget=yes"])
def test_the_bool_words_users_write_still_compose(override):
    register_configs()
    cli.check_run(cli.check_flags([*BASE, override]))  # composes and checks, trains nothing

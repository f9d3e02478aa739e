"""Command-line edges found by a red-team pass (2026-12-06): each is one line and exit 2 before any work.

A null config group, an unknown flag, a multirun with one bad value (refused before its first job trains or charges a
ledger), normalisation statistics of the wrong length, and
``aisec-train-sweep`` on a folder that is not a sweep. Labels that leave classes without a training record are
reported as sanity findings, and a one-sample test split no longer crashes after training.
"""

from __future__ import annotations

import numpy as np
import pytest

from aisec_train import sweep
from aisec_train.data.sanity import label_findings
from tests.fuzzing import BASE, call_cli, refusal_problems

FAST = [*BASE, "privacy=none", "train.epochs=1"]


def refused(run_dir, args: list[str], *needles: str) -> str:
    code, err, crash = call_cli([*args, f"hydra.run.dir={run_dir}"])
    assert refusal_problems(run_dir, code, err, crash) == [], (code, err, crash)
    assert all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("group", ["train", "privacy", "dataset"])
def test_a_null_config_group_names_the_group_and_its_options(tmp_path, group):
    refused(tmp_path / "run", [*FAST, f"{group}=null"], f"{group}=null is not allowed: config group {group} takes")


@pytest.mark.parametrize("flag", ["--foo", "--cfg=bogus"])
def test_an_unknown_flag_is_one_line(tmp_path, flag):
    refused(tmp_path / "run", [flag, *FAST], flag.split("=")[0] if flag == "--foo" else "bogus")


def test_a_multirun_with_one_bad_value_runs_no_job(tmp_path):
    """Job 0 (train.lr=0.1) is fine and job 1 (train.lr=-1) is not: the sweep is refused before job 0 trains."""
    sweep_dir = tmp_path / "sweep"
    code, err, crash = call_cli(["-m", *FAST, "train.lr=0.1,-1", f"hydra.sweep.dir={sweep_dir}"])
    assert refusal_problems(tmp_path / "none", code, err, crash) == [], (code, err, crash)
    assert "multirun job 1 (train.lr=-1) is refused, so no job ran" in err and "train.lr" in err, err
    assert not list(sweep_dir.glob("**/report.json")) and not list(sweep_dir.glob("**/checkpoints"))


def _npz(path, n: int, rng: np.random.Generator, labels=None):
    x = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
    y = np.asarray(labels if labels is not None else np.arange(n) % 2, dtype=np.int64)
    np.savez(path, x=x, y=y)
    return path


def test_a_one_sample_test_split_trains_and_reports_monitoring_as_not_applicable(tmp_path):
    """It used to train, then crash in the monitoring baseline (an empty half of the held-out split)."""
    import json

    rng = np.random.default_rng(0)
    train, test = _npz(tmp_path / "train.npz", 64, rng), _npz(tmp_path / "test.npz", 1, rng)
    run = tmp_path / "run"
    code, err, crash = call_cli([*FAST, "dataset=npz", f"dataset.path={train}", f"dataset.test_path={test}",
                                 f"hydra.run.dir={run}"])  # fmt: skip
    assert code == 0 and not crash, (err, crash)
    report = json.loads((run / "report.json").read_text())
    assert "1 held-out sample(s)" in report["monitoring"]["not_applicable"]
    assert "Not applicable: 1 held-out sample(s)" in (run / "security_report.md").read_text()


def test_normalisation_of_the_wrong_length_names_the_dataset_key_not_the_model(tmp_path):
    err = refused(tmp_path / "run", [*FAST, "dataset.normalize.mean=[0.5,0.5]", "dataset.normalize.std=[1,1]"],
                  "dataset.normalize.mean=[0.5, 0.5] is not allowed: the images have 1 channel(s)")  # fmt: skip
    assert "model._target_" not in err


def test_labels_that_leave_classes_untrained_are_findings():
    counts = np.bincount([0, 1, 1, 1000], minlength=1001)
    found = {f["check"]: f for f in label_findings(counts, np.array([0, 3, 3]))}
    assert found["classes_without_training_samples"]["count"] == 998
    assert found["test_labels_unseen_in_training"]["labels"] == [3]
    assert found["test_labels_unseen_in_training"]["count"] == 2
    assert label_findings(np.array([5, 5]), np.array([0, 1])) == []


def test_the_sweep_summary_refuses_a_folder_that_is_not_a_sweep_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "not_a_sweep"
    folder.mkdir()
    (tmp_path / "a_file").write_text("x")
    for target, needle in [(folder, "is not a sweep folder"), (tmp_path / "a_file", "is a file, not a sweep folder")]:
        with pytest.raises(SystemExit) as done:
            sweep.main([str(target)])
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1 and needle in err, err
    assert list(folder.iterdir()) == []

"""Operator edges found by a red-team pass (2026-12-06): multiruns, the ledger tool's key and artifacts.

Each bad input is one line and exit status 2 before any work:

- a multirun whose jobs share one folder (a constant ``hydra.sweep.subdir``) ran job 0, then job 1 resumed job 0's
  checkpoint and reported it as its own result; a subdir outside the sweep folder scattered jobs where the sweep's
  summary never finds them;
- a multirun whose later job names a missing data file (or ``dataset=npz`` with no path) trained the earlier jobs,
  charging their budgets, before the bad job was refused;
- ``aisec-train-ledger`` created a fresh key at a missing ``$AISEC_TRAIN_KEY_FILE`` and then called every ledger
  FORGED (a bad key file too: one FORGED line per ledger, not one line naming the key file);
- ``aisec-train-ledger retag --artifact MISSING`` re-tagged the store's ledgers first, then failed with a bare
  ``[Errno 2]`` naming only the tag's file name;
- ``aisec_train.run(run_dir="")`` trained into the working directory (a file: a bare OSError);
- ``aisec-train-sweep`` on a truncated, non-UTF-8 or folder ``report.json``: no file named, or a traceback;
- a bad ``$AISEC_TRAIN_OLD_KEY_FILES`` entry was blamed on ``audit.registry_path``;
- ``-m ... hydra.run.dir=X`` was ignored and the jobs trained into ``./multirun/DATE/TIME``;
- a blank ``$AISEC_TRAIN_LEDGER_STORE`` / ``privacy.ledger_store`` charged a fresh store (a fresh budget) in
  ``./' '``, and a blank ``$AISEC_TRAIN_KEY_FILE`` created a key there;
- an output setting under a file named a ``probe.json`` the user never gave, with mkdir's "File exists".
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from aisec_train.privacy import LedgerStore, ledger_cli
from tests.fuzzing import BASE, call_cli, refusal_problems

FAST = [*BASE, "privacy=none", "train.epochs=1"]


def refused_sweep(tmp_path, args: list[str], *needles: str) -> str:
    sweep_dir = tmp_path / "sweep"
    code, err, crash = call_cli(["-m", *FAST, *args, f"hydra.sweep.dir={sweep_dir}"])
    assert refusal_problems(tmp_path / "none", code, err, crash) == [], (code, err, crash)
    assert all(n in err for n in needles), err
    assert not list(tmp_path.glob("**/report.json")) and not list(tmp_path.glob("**/checkpoints")), err
    assert not list(tmp_path.glob("**/model.pt"))
    return err


# ---- multiruns ---------------------------------------------------------------------------------------------------
def test_a_multirun_whose_jobs_share_a_folder_is_refused_before_any_job(tmp_path):
    """Job 1 (train.lr=0.2) used to resume job 0's run (train.lr=0.1) in sweep/same and report it as its own."""
    refused_sweep(
        tmp_path,
        ["train.lr=0.1,0.2,0.3", "hydra.sweep.subdir=same"],
        "hydra.sweep.subdir='same' is not allowed",
        "multirun job 0 (train.lr=0.1) and multirun job 1 (train.lr=0.2) would both write into",
    )


@pytest.mark.parametrize("subdir", ["../escape", "/abs/job"])
def test_a_multirun_job_folder_outside_the_sweep_folder_is_refused(tmp_path, subdir):
    refused_sweep(
        tmp_path,
        [
            "train.lr=0.1,0.2",
            f"hydra.sweep.subdir={tmp_path}{subdir}" if subdir[0] == "/" else f"hydra.sweep.subdir={subdir}",
        ],
        "is not allowed (multirun job 0 (train.lr=0.1)): each job's folder must be a subfolder inside hydra.sweep.dir",
    )
    assert not (tmp_path / "escape").exists() and not (tmp_path / "abs").exists()


def _npz(path):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, size=(64, 8, 8), dtype=np.uint8), y=np.arange(64) % 2)
    return path


def test_a_later_job_with_a_missing_data_file_refuses_the_sweep_before_any_job(tmp_path):
    good, missing = _npz(tmp_path / "good.npz"), tmp_path / "missing.npz"
    refused_sweep(
        tmp_path,
        ["dataset=npz", f"dataset.path={good},{good},{missing}"],
        f"multirun job 2 (dataset.path={missing}) is refused, so no job ran",
        f"dataset.path='{missing}' does not exist or is not a file",
    )


def test_a_later_job_on_a_source_without_its_path_refuses_the_sweep_before_any_job(tmp_path):
    refused_sweep(
        tmp_path,
        ["dataset=digits,npz"],
        "multirun job 1 (dataset=npz) is refused, so no job ran",
        "dataset.path=None is not allowed: dataset=npz needs a file path",
    )


@pytest.mark.slow  # two (one-epoch) training jobs
def test_a_sweep_with_its_own_folders_still_runs(tmp_path):
    """The checks above leave a valid per-job subdir alone (here two jobs named by the model they train)."""
    sweep_dir = tmp_path / "sweep"
    code, err, crash = call_cli(
        ["-m", *FAST, "model=cnn,mlp", "hydra.sweep.subdir=${hydra.runtime.choices.model}_${hydra.job.num}",
         f"hydra.sweep.dir={sweep_dir}"]
    )  # fmt: skip
    assert code == 0 and not crash, (err[-2000:], crash)
    assert (sweep_dir / "cnn_0" / "report.json").is_file() and (sweep_dir / "mlp_1" / "report.json").is_file()


# ---- the ledger tool: its key and its artifacts ------------------------------------------------------------------
DS = hashlib.sha256(b"ops edges manifest").hexdigest()
RUN = {"delta": 1e-5, "accountant": "rdp", "sample_rate": 0.01, "noise_multiplier": 1.1, "split_seed": 0}


@pytest.fixture
def store(tmp_path, keyed, monkeypatch) -> LedgerStore:
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(tmp_path / "ledgers"))
    store = LedgerStore()
    with store.open(DS) as led:
        led.begin_run("runs/a", **RUN, target_epsilon=3.0, n_train=1437)
        led.charge("runs/a", [(1.1, 0.01, 100)])
    return store


def ledger(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        ledger_cli.main([str(a) for a in args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith("aisec-train-ledger: error: "), (code, err)
    assert "Traceback" not in err and all(n in err for n in needles), err


@pytest.mark.parametrize("command", [["verify"], ["list"], ["show", DS[:16]], ["retag"]])
def test_the_ledger_tool_never_creates_a_key_and_names_a_missing_one(store, tmp_path, monkeypatch, capsys, command):
    missing = tmp_path / "typo" / "hmac.key"
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(missing))
    before = (store.path / f"{DS}.json").read_bytes()
    code, out, err = ledger(capsys, *command)
    one_line(code, err, f"key file {missing} does not exist", "creates no key outside a rotation")
    assert out == "" and "FORGED" not in err
    assert not missing.exists() and not missing.parent.exists()
    assert (store.path / f"{DS}.json").read_bytes() == before


def test_a_bad_key_file_is_one_line_naming_it_not_a_forged_ledger(store, keyed, capsys):
    keyed.chmod(0o644)
    try:
        code, out, err = ledger(capsys, "verify")
    finally:
        keyed.chmod(0o600)
    one_line(code, err, f"key file {keyed} has mode 0644")
    assert out == "" and "FORGED" not in err


@pytest.mark.parametrize("kind", ["missing", "folder", "untagged"])
def test_retag_checks_every_artifact_before_any_work(store, tmp_path, capsys, kind):
    path = {"missing": tmp_path / "nope.pt", "folder": tmp_path, "untagged": tmp_path / "plain.pt"}[kind]
    if kind == "untagged":
        path.write_bytes(b"not a tagged checkpoint")
    code, out, err = ledger(capsys, "retag", "--artifact", path)
    one_line(code, err, f"--artifact '{path}' is not allowed")
    assert out == "", out  # no ledger was re-tagged before the bad argument was met


# ---- the Python API's run_dir ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api_cfg():
    import aisec_train

    return aisec_train.compose(FAST)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "run_dir='' is not allowed: an empty folder name would be the working directory itself"),
        ("blank", "run_dir='  ' is not allowed: an empty folder name"),
        ("file", "is a file, not a folder"),
        ("under_file", "is a file, not a folder"),
        ("number", "run_dir=5 is not allowed: a folder path (str or Path)"),
    ],
)
def test_the_api_run_dir_is_checked_before_anything_is_written(api_cfg, tmp_path, monkeypatch, kind, message):
    """run_dir='' trained and wrote model.pt, report.json, checkpoints/ ... into the working directory; a file
    raised a bare FileExistsError / NotADirectoryError, and a number a TypeError."""
    import aisec_train
    from aisec_train.errors import ConfigError

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "afile").write_text("x")
    value = {"empty": "", "blank": "  ", "file": str(tmp_path / "afile"), "number": 5}.get(
        kind, str(tmp_path / "afile" / "sub")
    )
    with pytest.raises(ConfigError) as err:
        aisec_train.run(api_cfg, run_dir=value)
    assert message in str(err.value) and "\n" not in str(err.value), err.value
    assert list(cwd.iterdir()) == [] and (tmp_path / "afile").read_text() == "x"


# ---- aisec-train-sweep: a report that cannot be read -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated", "not_utf8", "folder"])
def test_the_sweep_summary_names_an_unreadable_report_and_writes_nothing(tmp_path, capsys, kind):
    """A truncated report.json was refused without naming its file; a non-UTF-8 one or a folder named report.json
    ended in a UnicodeDecodeError / IsADirectoryError traceback."""
    from aisec_train import sweep

    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    report = tmp_path / "0" / "report.json"
    report.parent.mkdir()
    if kind == "folder":
        report.mkdir()
    else:
        report.write_bytes(b'{"privacy": {"epsi' if kind == "truncated" else b"\xff\xfe{}")
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("aisec-train-sweep: error: "), err
    assert f"{report} " in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("sweep_summary.*"))


# ---- the trainer: a bad verify-only old key ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "group_readable"])
def test_a_bad_old_key_file_is_named_before_any_work(tmp_path, monkeypatch, keyed, kind):
    """A missing or group-readable $AISEC_TRAIN_OLD_KEY_FILES entry was blamed on audit.registry_path (when the
    registry held entries) or went unnoticed until a ledger was verified."""
    old = tmp_path / "old.key"
    if kind == "group_readable":
        old.write_text("ab" * 32 + "\n")
        old.chmod(0o640)
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(old))
    run_dir = tmp_path / "run"
    code, err, crash = call_cli([*FAST, f"hydra.run.dir={run_dir}"])
    assert refusal_problems(run_dir, code, err, crash) == [], (code, err, crash)
    assert f"$AISEC_TRAIN_OLD_KEY_FILES: key file {old} " in err and "registry" not in err, err


def test_a_multirun_given_a_run_dir_is_refused_not_written_to_the_default_folder(tmp_path, monkeypatch):
    """Hydra ignores hydra.run.dir in a multirun: the jobs trained into ./multirun/DATE/TIME of the launch folder."""
    monkeypatch.chdir(tmp_path)
    code, err, crash = call_cli(["-m", *FAST, "train.lr=0.1,0.2", f"hydra.run.dir={tmp_path / 'runs'}"])
    assert refusal_problems(tmp_path / "runs", code, err, crash) == [], (code, err, crash)
    assert "is not allowed with -m/--multirun" in err and "hydra.sweep.dir" in err, err
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "runs").exists()


# ---- blank paths in the environment ------------------------------------------------------------------------------
@pytest.mark.parametrize("var", ["AISEC_TRAIN_LEDGER_STORE", "AISEC_TRAIN_KEY_FILE"])
def test_a_blank_store_or_key_variable_is_refused_not_a_fresh_one_in_the_working_directory(tmp_path, monkeypatch, var):
    """AISEC_TRAIN_LEDGER_STORE=' ' charged a fresh store in ./' ' (a DP run on spent data trained on a new budget);
    AISEC_TRAIN_KEY_FILE=' ' created a new key ./' '."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(var, " ")
    run_dir = tmp_path / "run"
    code, err, crash = call_cli([*BASE, "train.epochs=1", f"hydra.run.dir={run_dir}"])
    assert refusal_problems(run_dir, code, err, crash) == [], (code, err, crash)
    assert f"${var}=' ' is not allowed" in err, err
    assert list(cwd.iterdir()) == []


def test_a_blank_ledger_store_setting_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code, err, crash = call_cli([*BASE, "train.epochs=1", "privacy.ledger_store=' '", f"hydra.run.dir={run_dir}"])
    assert refusal_problems(run_dir, code, err, crash) == [], (code, err, crash)
    assert "privacy.ledger_store=' ' is not allowed: a ledger store folder, not blank" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written: the run folder is not even made


@pytest.mark.parametrize("setting", ["privacy.ledger_store={file}", "audit.registry_path={file}/registry.json"])
def test_an_output_setting_under_a_file_names_the_file(tmp_path, setting):
    """It said '{file}/probe.json cannot be written (File exists)': a probe name the user never gave, and errno's
    words for mkdir on a file."""
    file = tmp_path / "afile"
    file.write_text("x")
    run_dir = tmp_path / "run"
    code, err, crash = call_cli([*BASE, "train.epochs=1", setting.format(file=file), f"hydra.run.dir={run_dir}"])
    assert refusal_problems(run_dir, code, err, crash) == [], (code, err, crash)
    assert f"{setting.split('=')[0]}: {file} is a file, not a folder" in err and "probe" not in err, err
    assert file.read_text() == "x"

"""The one refusal helper every console script uses (aisec_train/errors.py), and the classes it is classified by."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from aisec_train import errors
from aisec_train.errors import ConfigError, Refusal, RefusingParser, refuse, refusing


def _exit(fn, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        fn()
    return stop.value.code, capsys.readouterr().err


def test_refuse_prints_one_line_naming_the_program_and_exits_2(capsys):
    code, err = _exit(lambda: refuse("aisec-train-x", "bad value\n  spread over\tlines"), capsys)
    assert code == 2 and err == "aisec-train-x: error: bad value spread over lines\n"


def test_a_usage_error_is_one_line_under_the_program_name_even_in_a_subcommand(capsys):
    parser = RefusingParser(prog="aisec-train-x")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show").add_argument("--n", type=int, required=True)
    for argv, needle in ((["nope"], "invalid choice: 'nope'"), (["show"], "required: --n"), (["show", "--n=a"], "a")):
        code, err = _exit(lambda argv=argv: parser.parse_args(argv), capsys)
        assert code == 2 and err.startswith("aisec-train-x: error: ") and needle in err, err
        assert err.count("\n") == 1 and "usage:" not in err


def test_refusing_answers_only_the_classes_it_is_given(capsys):
    code, err = _exit(lambda: _raise_inside(ConfigError("k=1 is not allowed: x")), capsys)
    assert code == 2 and err == "aisec-train-x: error: k=1 is not allowed: x\n"
    with pytest.raises(KeyError):  # a bug stays a traceback
        _raise_inside(KeyError("bug"))


def _raise_inside(err: BaseException) -> None:
    with refusing("aisec-train-x", Refusal):
        raise err


def test_every_refusal_class_is_a_refusal_and_the_cli_answers_them_by_class():
    from aisec_train.audit.registry import RegistryError
    from aisec_train.cli import refusals
    from aisec_train.data.errors import DataError
    from aisec_train.privacy.ledger import BudgetExhausted
    from aisec_train.store.errors import BudgetError, IntegrityError, LockError, StoreError
    from aisec_train.train.callbacks import NonFiniteError
    from aisec_train.train.checkpoint import CheckpointError

    kinds = (ConfigError, DataError, StoreError, IntegrityError, LockError, BudgetError, CheckpointError)
    for kind in (*kinds, RegistryError, BudgetExhausted, NonFiniteError):
        assert issubclass(kind, Refusal) and issubclass(kind, refusals()), kind
    assert not issubclass(RuntimeError, refusals()) and not issubclass(KeyError, refusals())


def test_the_cli_refuses_without_importing_torch():
    """Classifying by class needs no heavy import: a bad override is refused before torch loads."""
    code = (
        "import sys; sys.argv = ['aisec-train', 'train.epochs=0']\n"
        "from aisec_train.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["2", "False"], out.stderr[-2000:]
    assert out.stderr.strip().startswith("aisec-train: error: train.epochs=0") and out.stderr.count("\n") == 1


def test_checkpoint_reads_are_refusals_and_write_failures_stay_os_errors(tmp_path, monkeypatch):
    from aisec_train.store import artifacts
    from aisec_train.train import checkpoint

    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.manifest(tmp_path / "missing.pt")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "save_artifact", full_disk)  # the disk, not the checkpoint: the CLI's write line
    with pytest.raises(OSError) as raised:
        checkpoint.save({"w": 1}, tmp_path / "model.pt")
    assert not isinstance(raised.value, errors.Refusal) and raised.value.errno == errno.ENOSPC

"""``train.distributed.timeout``: how long a rank waits at the rendezvous and in each collective.

A shell that still exported a finished job's ``RANK=1 WORLD_SIZE=2 MASTER_ADDR MASTER_PORT`` (no rank 0 anywhere)
made ``aisec-train`` wait torch's default 30 minutes in ``init_process_group``, then end in a traceback."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

import aisec_train
from aisec_train.errors import ConfigError
from aisec_train.train.distributed import _HeldStderr, _join
from aisec_train.train.launch import NODE_LOCAL, check_agreement, job_view
from tests.conftest import run_cli

ALLOWED = "must be a number of seconds from 1 to 86400 (a day)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stale_env(monkeypatch):
    """torchrun's env:// variables as a stale shell leaves them: nobody listens on MASTER_PORT."""
    port = _free_port()
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "SUBMITIT_EXECUTOR", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    return port


def test_the_default_is_ten_minutes():
    assert aisec_train.compose([]).train.distributed.timeout == 600


@pytest.mark.parametrize("value", ["0", "-1", "0.5", "86401", "1e9", "nan", "inf", "-inf"])
def test_a_timeout_out_of_range_is_refused_in_one_line(value):
    with pytest.raises(ConfigError) as err:
        aisec_train.compose([f"train.distributed.timeout={value}"])
    line = str(err.value)
    assert line.startswith("train.distributed.timeout=") and line.endswith(f"is not allowed: {ALLOWED}")
    assert "\n" not in line


def test_the_ends_of_the_range_are_allowed():
    for value in ("1", "86400", "3.5"):
        assert aisec_train.compose([f"train.distributed.timeout={value}"]).train.distributed.timeout == float(value)


def test_a_bad_timeout_is_refused_by_the_cli_before_hydra_writes_anything(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli(f"hydra.run.dir={run_dir}", "train.epochs=1", "train.distributed.timeout=nan", timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"aisec-train: error: train.distributed.timeout=nan is not allowed: {ALLOWED}"
    assert not run_dir.exists()


def test_the_group_is_formed_with_the_configured_timeout(monkeypatch):
    # A world of one: the rendezvous completes at once; the collectives' default timeout is the configured one.
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    _join("gloo", torch.device("cpu"), 7)
    try:
        assert dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds() == 7
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank", ["1", "0"])  # 1: no store to connect to; 0: the store is up, no peer joins
def test_a_stale_env_gives_up_after_the_timeout_in_one_line(stale_env, monkeypatch, capfd, rank):
    monkeypatch.setenv("RANK", rank)
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        _join("gloo", torch.device("cpu"), 1)
    assert time.monotonic() - started < 15  # torch's default waited 30 minutes
    line = str(err.value)
    assert line.startswith(f"train.distributed.timeout=1 ran out: rank {rank} of WORLD_SIZE=2 waited 1 s at the ")
    assert f"MASTER_ADDR:MASTER_PORT=127.0.0.1:{stale_env}" in line and "unset RANK, WORLD_SIZE" in line
    assert "\n" not in line
    assert not dist.is_initialized()
    # torch's C++ store client logged each failed attempt with a C++ backtrace on fd 2: held back, not printed
    assert "frame #" not in capfd.readouterr().err


def test_what_torch_prints_while_the_group_forms_still_reaches_stderr(capfd):
    with _HeldStderr():
        os.write(2, b"a warning from the C++ side\n")
    assert capfd.readouterr().err == "a warning from the C++ side\n"
    with _HeldStderr() as held:
        os.write(2, b"retry 1 of a connection that timed out\n")
        held.discard()
    assert capfd.readouterr().err == ""


@pytest.mark.slow  # the CLI loads the data before the rendezvous (about 10-20 s on 2 busy cores)
def test_the_cli_in_a_stale_env_ends_after_the_timeout_with_one_line(stale_env, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    done = run_cli(f"hydra.run.dir={run_dir}", "train.epochs=1", "train.distributed.timeout=3", timeout=120)
    assert time.monotonic() - started < 60
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # no traceback, no C++ log
    assert done.stderr.startswith("aisec-train: error: train.distributed.timeout=3 ran out: rank 1 of WORLD_SIZE=2")
    assert f"127.0.0.1:{stale_env}" in done.stderr
    # rank 1 writes nothing of its own (no .hydra/, no log, no checkpoint): rank 0's job, as before the change
    assert not run_dir.exists() or not any(run_dir.iterdir())
    ledgers = os.environ["AISEC_TRAIN_LEDGER_STORE"]
    assert not os.path.exists(ledgers) or not any(p.endswith(".json") for p in os.listdir(ledgers))


def test_ranks_may_differ_in_their_timeout_and_nothing_else():
    # A node-local setting: it changes no weight, noise or charge, only when that rank gives up.
    assert "train.distributed.timeout" in NODE_LOCAL
    views = [job_view(aisec_train.compose([f"train.distributed.timeout={t}"]), "abc") for t in (600, 1800)]
    assert "train.distributed.timeout" not in views[0]
    check_agreement([("/runs/a", views[0]), ("/runs/a", views[1])], rank=1)
    other = job_view(aisec_train.compose(["train.distributed.port=29511"]), "abc")
    with pytest.raises(ConfigError, match=r"^train.distributed.port=29511 is not allowed: the ranks of this torchrun"):
        check_agreement([("/runs/a", views[0]), ("/runs/a", other)], rank=1)


def test_under_torchrun_the_timeout_must_outlast_rank_0s_lock_wait(stale_env, monkeypatch):
    # Rank 0 takes the run directory's and the ledger's locks (up to train.lock_wait_s) before the rendezvous,
    # while the other ranks already wait there.
    with pytest.raises(ConfigError) as err:
        aisec_train.compose(["train.lock_wait_s=14400"])
    assert str(err.value).startswith(
        "train.distributed.timeout=600 is not allowed with train.lock_wait_s=14400 under torchrun: "
    )
    aisec_train.compose(["train.lock_wait_s=14400", "train.distributed.timeout=15000"])
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name)
    aisec_train.compose(["train.lock_wait_s=14400"])  # one process: nobody waits at a rendezvous

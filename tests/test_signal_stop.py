"""A run stopped by a signal part-way through training (a scheduler's SIGTERM, Ctrl-C's SIGINT): every private step
taken is charged to the dataset's ledger, even those no checkpoint holds, and the stop is one line with the
signal's exit status, no traceback and no model (aisec_train/errors.py's ``stop_on_signals``, train/loop.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aisec_train.errors import Stopped, stop_on_signals
from tests.conftest import LEDGER_ENV, REPO, signal_past_first_checkpoint

STOPPED = re.compile(
    r"^aisec-train: stopped by (SIGTERM|SIGINT|SIGHUP) in epoch (\d+) with (\d+) private step\(s\) taken in all, "
    r"all charged to the dataset's privacy ledger; the last good checkpoint is kept and no model is released; run "
    r"the same command with the same hydra.run.dir to resume from the last checkpoint$"
)


def ledger_steps() -> int:
    out = subprocess.run(
        [sys.executable, "-m", "aisec_train.privacy.ledger_cli", "list"], capture_output=True, text=True, check=True
    ).stdout
    return sum(int(n) for n in re.findall(r"\bsteps (\d+)", out))


def default_signals() -> None:
    """In the child: the default disposition of the stop signals, as a terminal's shell gives it. A test run under
    `nohup` (CI's background job) would hand the child SIGHUP ignored, which the run then rightly keeps ignoring."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def checkpoint_steps(run: Path) -> int:
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return sum(entry[2] for entry in payload["ledger"]["history"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_signal_part_way_charges_every_step_and_ends_in_one_line(tmp_path, sig):
    """SIGTERM (a scheduler) and SIGHUP (a closed terminal or SSH session: its default killed the run with the steps
    since the last checkpoint uncharged). SIGINT takes the same handler (and the in-process stops of
    tests/test_spend.py the same charge)."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "aisec_train", "experiment=smoke", "train.epochs=300", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)  # fmt: skip
    try:
        signal_past_first_checkpoint(proc, run, sig, settle=0.5)  # into a later epoch, between two checkpoints
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert "Traceback" not in err
    match = STOPPED.match(lines[-1])
    assert match and match[1] == sig.name, lines[-1]
    taken = int(match[3])
    assert os.environ[LEDGER_ENV] and ledger_steps() == taken  # all of them, not only the checkpoint's
    assert checkpoint_steps(run) <= taken and not (run / "model.pt").exists()


def test_a_second_signal_cannot_cut_the_charge_short_and_the_handlers_come_back():
    """The first signal raises Stopped; one more while the loop charges the steps taken is ignored (a second
    Ctrl-C used to be a KeyboardInterrupt inside the ledger's write); outside the block the old handlers return."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped) as caught:
        with stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs between bytecodes, long before this ends
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C, during the charge
                os.kill(os.getpid(), signal.SIGHUP)  # and the terminal closed
                time.sleep(0.2)
    assert caught.value.signum == signal.SIGTERM and str(caught.value) == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
    """`nohup aisec-train ...` starts with SIGHUP ignored so that the run outlives the terminal; turning it into a
    stop would end the run the user asked to keep going. The same for SIGINT in a shell's background job."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the others are still answered
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)  # nothing happens: no Stopped, no death
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_sigterm_in_a_later_stage_names_the_stage_not_an_audit_models_loop(tmp_path):
    """The audit trains reference models through the same loop: a stop there used to read as the run's training
    (`in epoch 24 with 18130 step(s) taken`). Only the run's own loop (the one that checkpoints) says its steps;
    any other stop names the stage."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "aisec_train", "experiment=smoke", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        log = run / "cli.log"
        while proc.poll() is None and time.monotonic() < deadline:
            if log.exists() and "stage audit" in log.read_text():
                break
            time.sleep(0.1)
        time.sleep(0.5)  # into the reference models' training
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    line = [x for x in re.split(r"[\r\n]", err) if x.strip()][-1]
    assert line.startswith("aisec-train: stopped by SIGTERM in stage audit, after training; run the same command"), line
    assert ledger_steps() == checkpoint_steps(run) > 0  # training ended: every step charged, held by the checkpoint
    assert not (run / "model.pt").exists()


def test_which_processes_answer_signals_themselves(monkeypatch):
    """One process and each rank of your own torchrun turn SIGINT/SIGTERM into a charged stop; nproc's job process
    leaves it to its ranks, a federated run to Flower, and a submitit task to submitit, which ignores SIGTERM on
    purpose and requeues on its own signal through sys.exit (the loop charges that stop like any other)."""
    import aisec_train
    from aisec_train.cli import answers_signals

    for name in ("SUBMITIT_EXECUTOR", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert answers_signals(aisec_train.compose([]))
    assert not answers_signals(aisec_train.compose(["train.distributed.nproc=2"]))
    assert not answers_signals(aisec_train.compose(["federated=fedavg"]))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # one rank of your own torchrun
    assert answers_signals(aisec_train.compose([]))
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert not answers_signals(aisec_train.compose([]))

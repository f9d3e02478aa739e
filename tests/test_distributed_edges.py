"""``train.distributed.nproc=N``: what a refusal, a rendezvous that times out and a stalled rank leave behind.

Each used to end differently from the same input in one process: a refusal met during training left
``checkpoints/distributed_result.pt`` (holding only the refusal) in the run directory; a rank that reached the
rendezvous past ``train.distributed.timeout`` ended in the elastic agent's tracebacks (~130 lines, exit 1); a
collective that timed out mid-training (one rank stalled) too, with the steps taken since the last checkpoint
never charged to the dataset's ledger. Now each is one line on stderr, exit 2 (docs/cluster.md).

The ranks are real gloo processes on 127.0.0.1 started through the CLI; the stalls are real (a rank that sleeps
at start-up, a model whose forward sleeps on rank 1), set up through what a user can give: ``PYTHONPATH`` and
``model._target_``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from aisec_train.errors import ConfigError
from aisec_train.train import checkpoint
from aisec_train.train.distributed import (
    _end_the_line_of_a_killed_bar,
    _failed_attempt,
    _join,
    _killed,
    _lost_peer,
    _rank_report,
    _reported,
    _with_cause,
)
from tests.conftest import REPO, signal_past_first_checkpoint

SMOKE = ["experiment=smoke", "audit=off", "robustness.evaluate=false", "train.epochs=1"]

MODELS = '''
import os
import time

import torch
import torch.nn.functional as F
from torch import nn


class Tied(nn.Module):
    """A tied output head read outside its layer: refused at the first training forward, in every rank."""

    def __init__(self, in_channels, num_classes, image_size=8):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, num_classes)
        self.fc2 = nn.Linear(num_classes, num_classes)

    def forward(self, x):
        return F.linear(self.fc1(x.flatten(1)), self.fc2.weight)


class Stall(nn.Module):
    """Rank 1 stalls for a minute in its training forward number STALL_AT (a hung file system, a stuck loader)."""

    def __init__(self, in_channels, num_classes, image_size=8):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, num_classes)
        self.calls = 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if os.environ.get("RANK") == "1" and self.calls == int(os.environ["STALL_AT"]):
                time.sleep(60)
        return self.fc1(x.flatten(1))
'''

SLOW_START = """
import os
import sys
import time

# A local rank that starts late (a busy machine): the launcher's second spawned process sleeps at start-up. (RANK is
# not in a spawned rank's environment yet when site runs: the agent sets it once the child has unpickled its task.)
marker = os.environ.get("SLOW_RANK_MARKER")
if marker and "--multiprocessing-fork" in sys.argv:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # the first rank starts at once
    except FileExistsError:
        time.sleep(float(os.environ["SLOW_RANK_START_S"]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """The console script as a user runs it; stderr as the terminal gets it (bytes: text mode would turn tqdm's
    carriage returns into line breaks)."""
    mods = tmp_path / "mods"
    mods.mkdir(exist_ok=True)
    (mods / "edge_models.py").write_text(textwrap.dedent(MODELS))
    (mods / "sitecustomize.py").write_text(textwrap.dedent(SLOW_START))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(mods), **(env or {}),
           "AISEC_TRAIN_LEDGER_STORE": str(tmp_path / "ledgers")}  # fmt: skip
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-m", "aisec_train", *args], cwd=REPO, env=env, capture_output=True,
                          timeout=540)  # fmt: skip
    return done.returncode, done.stderr.decode()


def _screen(err: str) -> list[str]:
    """The lines a terminal shows: a progress bar redrawn with carriage returns and replaced counts as its last."""
    return [shown for line in err.split("\n") if (shown := line.split("\r")[-1].strip())]


def _tree(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


def _ledger_steps(tmp_path: Path) -> int:
    """Steps charged in the test's own ledger store (:func:`_cli`), every dataset and run."""
    store = tmp_path / "ledgers"
    steps = 0
    for path in store.glob("*.json"):
        for record in json.loads(path.read_text())["records"]:
            if record["kind"] == "charge":
                steps += sum(n for _, _, n in record["history"])
    return steps


# ---- fast: the pieces, with real stores and files ----------------------------------------------------------------


def test_a_local_rank_that_times_out_at_the_agents_store_is_one_line(monkeypatch, capfd):
    """Under the elastic agent every rank is a client of the agent's store; rank 0 waiting there for a rank that
    came late got torch's ``DistStoreError('wait timeout after 1000ms')``, which was re-raised (not "timed out")."""
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(ConfigError) as err:
            _join("gloo", torch.device("cpu"), 1, nproc=2)
    finally:
        del server
    line = str(err.value)
    assert line.startswith(
        "train.distributed.timeout=1 ran out: rank 0 of the 2 local ranks of train.distributed.nproc=2 waited 1 s "
    ), line
    assert "raise train.distributed.timeout (allowed: 1 to 86400 s)" in line and "\n" not in line
    assert "unset RANK" not in line  # the job set those variables itself: nothing for the user to unset
    assert not dist.is_initialized()
    assert "frame #" not in capfd.readouterr().err  # torch's C++ retries held back


def test_a_refusal_of_one_rank_wins_over_the_others_timeout(tmp_path):
    """A rank that refuses alone leaves the others in their next collective until it times out: the refusal is
    what the user must see, whichever rank met it; then rank 0's outcome; None when no rank reported."""
    result = str(tmp_path / "result.pt")
    assert _reported(result, 3) is None
    checkpoint.save({"refusal": "ConfigError", "message": "ran out", "collective_timeout": True}, Path(result))
    assert _reported(result, 3)["message"] == "ran out"
    checkpoint.save({"refusal": "DataError", "message": "rank 2's shard"}, Path(_rank_report(result, 2)))
    assert _rank_report(result, 2) != result and _rank_report(result, 0) == result
    assert _reported(result, 3) == {"refusal": "DataError", "message": "rank 2's shard"}


def test_a_lost_peer_is_a_symptom_and_the_killed_rank_is_named_on_the_last_attempt(tmp_path):
    """A rank whose peer died reports it as a timed-out one does: never the refusal the job ends with while a rank
    refused on its own, restarted while restarts are left, and on the last attempt told with the rank that was
    killed. A rank that exited with a status raised an error of its own: not turned into a line here."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:5541: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")  # fmt: skip
    assert _lost_peer(gloo) and not _lost_peer(RuntimeError("Connection reset by peer"))  # a collective's only
    assert not _lost_peer(RuntimeError("[gloo] Timed out waiting 5000ms for recv"))
    result = str(tmp_path / "result.pt")
    lost = {"refusal": "ConfigError", "message": "rank 0 of 2 lost another rank", "lost_peer": True, "time": 2.0}
    checkpoint.save(lost, Path(result))
    assert _reported(result, 2) == lost
    stop = {"stopped": 15, "where": "", "rank": 1, "time": 1.0}  # a signal to rank 1 alone, before rank 0 lost it:
    checkpoint.save(stop, Path(_rank_report(result, 1)))  # the job stops, never restarted
    assert _reported(result, 2) == stop
    cleanup = {**stop, "time": 3.0}  # the agent's SIGTERM to rank 1 after rank 0 had failed: not a stop
    checkpoint.save(cleanup, Path(_rank_report(result, 1)))
    assert _reported(result, 2) == lost
    checkpoint.save({"refusal": "DataError", "message": "rank 1's shard"}, Path(_rank_report(result, 1)))
    assert _reported(result, 2)["refusal"] == "DataError"

    def failed(exitcode: int) -> ChildFailedError:
        failure = ProcessFailure(local_rank=1, pid=12345, exitcode=exitcode, error_file=str(tmp_path / "none"))
        return ChildFailedError("_elastic_worker", {1: failure})

    assert _killed(failed(-9)) == "rank 1 was killed by SIGKILL" and _killed(failed(1)) is None
    assert _killed(RuntimeError("rendezvous")) is None
    told = _with_cause(lost, failed(-9), restarts=0)["message"]
    assert told.endswith("(rank 1 was killed by SIGKILL; train.distributed.max_restarts=0 restart(s) used up)")
    assert _with_cause(lost, failed(1), restarts=2) == lost


def test_a_stop_report_after_a_rank_was_killed_is_the_agents_cleanup_not_a_stop(tmp_path):
    """One rank SIGKILLed while its peer was inside a long step: the agent's SIGTERM to the peer came before the
    closed connection, so the only report is the peer's stop. That ended the job as stopped (exit 143, never
    restarted); the kill is the failure. A rank that stopped on its own signal exits 128 + N, and a stop signal that
    ended a rank before its handler was set (exit -15) is still a stop."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(exitcode: int) -> ChildFailedError:
        failure = ProcessFailure(local_rank=1, pid=12345, exitcode=exitcode, error_file=str(tmp_path / "none"))
        return ChildFailedError("_elastic_worker", {1: failure})

    result = str(tmp_path / "result.pt")
    assert _failed_attempt(result, 2, failed(-9)) is None
    stop = {"stopped": 15, "where": " at step 3", "rank": 0, "time": 1.0}
    checkpoint.save(stop, Path(result))
    assert _failed_attempt(result, 2, failed(-9)) is None and _failed_attempt(result, 2, failed(-11)) is None
    assert _failed_attempt(result, 2, failed(143)) == stop and _failed_attempt(result, 2, failed(-15)) == stop
    assert _failed_attempt(result, 2, RuntimeError("rendezvous")) == stop
    lost = {"refusal": "ConfigError", "message": "rank 0 of 2 lost another rank", "lost_peer": True, "time": 2.0}
    checkpoint.save(lost, Path(result))
    assert _failed_attempt(result, 2, failed(-9)) == lost  # the peer met the closed connection first: as before


def test_a_killed_rank_0s_open_bar_line_is_ended_before_the_jobs_line(tmp_path, capsys):
    """Rank 0 draws the progress bar: killed by a signal, it left the bar's line open and the job's one line was
    printed at its end. Only then is a line break written; a rank that exited, or another rank, leaves none."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(rank: int, exitcode: int) -> ChildFailedError:
        failure = ProcessFailure(local_rank=rank, pid=12345, exitcode=exitcode, error_file=str(tmp_path / "none"))
        return ChildFailedError("_elastic_worker", {rank: failure})

    for err in (failed(0, 1), failed(0, 143), failed(1, -9), RuntimeError("rendezvous")):
        _end_the_line_of_a_killed_bar(err)
    assert capsys.readouterr().err == ""
    _end_the_line_of_a_killed_bar(failed(0, -9))
    assert capsys.readouterr().err == "\n"


# ---- slow: the CLI, two real gloo ranks ---------------------------------------------------------------------------


@pytest.mark.slow  # two CLI runs, one of them nproc=2 (~30-70 s on 2 busy cores)
def test_a_refusal_at_the_first_forward_leaves_what_one_process_leaves(tmp_path):
    args = [*SMOKE, "model._target_=edge_models.Tied", "privacy.ledger_store=scratch"]
    one, two = tmp_path / "one", tmp_path / "two"
    code, err = _cli(tmp_path, *args, f"hydra.run.dir={one}")
    assert code == 2, err[-3000:]
    alone = _screen(err)
    code, err = _cli(tmp_path, *args, "train.distributed.nproc=2", f"hydra.run.dir={two}")
    assert code == 2, err[-3000:]
    lines = _screen(err)
    assert len(lines) == 1 and lines[0].startswith("aisec-train: error: parameter 'fc2.weight' "), lines
    assert "is used outside its layer's forward" in lines[0]
    assert lines == alone  # the parameter named as one process names it (it was module.fc2.weight under DDP)
    assert _tree(two) == _tree(one)  # no checkpoints/distributed_result.pt holding only the refusal
    assert not (two / "checkpoints").exists()


@pytest.mark.slow  # an nproc=2 run whose second rank starts 8 s late (~30-70 s on 2 busy cores)
def test_a_rank_that_starts_past_the_timeout_ends_the_job_in_one_line(tmp_path):
    run = tmp_path / "run"
    slow = {"SLOW_RANK_START_S": "8", "SLOW_RANK_MARKER": str(tmp_path / "first-rank")}
    code, err = _cli(tmp_path, *SMOKE, "train.distributed.nproc=2", "train.distributed.timeout=1",
                     f"hydra.run.dir={run}", env=slow)  # fmt: skip
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "_elastic_worker FAILED" not in err, err[-3000:]
    lines = _screen(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("aisec-train: error: train.distributed.timeout=1 ran out: rank "), lines
    assert "of the 2 local ranks of train.distributed.nproc=2 waited 1 s at the rendezvous" in lines[0]
    assert not (run / "checkpoints").exists() and not (run / "model.pt").exists()
    assert _ledger_steps(tmp_path) == 0  # nothing was trained, nothing charged


@pytest.mark.slow  # an nproc=2 run of 2 epochs that stalls in the second (~60-90 s on 2 busy cores)
def test_a_stalled_rank_ends_the_job_in_one_line_with_its_steps_charged(tmp_path):
    run = tmp_path / "run"
    # smoke draws about 3 batches an epoch, each one forward a rank (plus none: the first is the watched one):
    # forward 5 is in the second epoch, after the first epoch's checkpoint.
    code, err = _cli(tmp_path, *SMOKE, "train.epochs=2", "model._target_=edge_models.Stall",
                     "train.distributed.nproc=2", "train.distributed.timeout=5", f"hydra.run.dir={run}",
                     env={"STALL_AT": "5"})  # fmt: skip
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "leaked semaphore" not in err, err[-3000:]
    lines = _screen(err)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("aisec-train: error: train.distributed.timeout=5 ran out: rank 0 of 2 waited 5 s in a "
                           "collective at step "), line  # fmt: skip
    assert "no model is released" in line and "the last good checkpoint is kept" in line
    assert not (run / "model.pt").exists() and not (run / "report.json").exists()
    kept = checkpoint.load(run / "checkpoints" / "last.pt", root=run)
    assert kept["epoch"] == 1
    charged = _ledger_steps(tmp_path)
    assert f"; {charged} step(s) taken, all charged" in line
    assert charged > kept["steps"]  # the steps of the epoch cut short were spent too: charged, not dropped
    assert not any(p.name.startswith("distributed_result") for p in run.rglob("*"))


@pytest.mark.slow  # an nproc=2 run stopped by SIGTERM part-way (~30-60 s on 2 busy cores)
def test_a_sigterm_to_a_data_parallel_job_charges_rank_zeros_steps_and_ends_in_one_line(tmp_path):
    """A scheduler's SIGTERM to an `nproc` job: torch's agent stopped the ranks with SIGTERM, which killed them
    where they stood, so the steps after rank 0's last checkpoint went uncharged, and the job ended in the agent's
    `RuntimeError: data-parallel training failed after 0 restart(s): Process ... got signal: 15` traceback, exit 1.
    Now each rank turns it into Stopped: rank 0 charges every step it took, and the job ends in one line, 143."""
    import signal

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AISEC_TRAIN_LEDGER_STORE": str(tmp_path / "ledgers")}
    env.pop("HYDRA_FULL_ERROR", None)
    args = ["experiment=smoke", "train.epochs=300", "train.distributed.nproc=2", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "aisec_train", *args], cwd=REPO, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        signal_past_first_checkpoint(proc, run, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    text = err.decode()
    assert proc.returncode == 143 and "Traceback" not in text, text[-3000:]
    last = _screen(text)[-1]
    assert last.startswith("aisec-train: stopped by SIGTERM (train.distributed.nproc=2: rank 0 in epoch "), last
    taken = int(last.split(" with ")[1].split(" private step(s)")[0])
    assert "all charged to the dataset's privacy ledger" in last and _ledger_steps(tmp_path) == taken
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert sum(n for _, _, n in payload["ledger"]["history"]) <= taken and not (run / "model.pt").exists()

"""torchrun is the engine: real ``python -m torch.distributed.run`` jobs over loopback (gloo, c10d rendezvous),
two "nodes" of one process each, against one process with the same config; the run directory every rank must
agree on; an elastic restart after a killed worker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aisec_train.errors import ConfigError
from aisec_train.train.launch import cli_overrides
from tests.conftest import REPO, read_report, run_cli, signal_past_first_checkpoint

# An explicit noise multiplier with a loose target: both jobs take the same steps at the same noise.
JOB = ["experiment=smoke", "audit=off", "robustness.evaluate=false", "train.epochs=2"]
JOB += ["privacy.noise_multiplier=1.5", "privacy.target_epsilon=50"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_nodes(tmp: Path, overrides_per_node: list[list[str]], rdzv_id: str = "t1") -> list:
    """One torchrun agent per "node", all on loopback; returns (returncode, stdout, stderr) of each. Output goes to
    files: a pipe read only after the other node ends could fill, stall its node and so the rendezvous."""
    port, procs, logs = free_port(), [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    for overrides in overrides_per_node:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(overrides_per_node)}",
            "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
            "-m", "aisec_train", *overrides,
        ]  # fmt: skip
        logs.append(((tmp / f"{rdzv_id}-{len(logs)}.out").open("w+"), (tmp / f"{rdzv_id}-{len(logs)}.err").open("w+")))
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=logs[-1][0], stderr=logs[-1][1], text=True))
    results = []
    for proc, (out, err) in zip(procs, logs, strict=True):
        proc.wait(timeout=600)
        out.seek(0), err.seek(0)
        results.append((proc.returncode, out.read(), err.read()))
    return results


@pytest.fixture(scope="module")
def two_nodes_and_one(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    registry = [f"audit.registry_path={tmp / 'registry.json'}"]
    one = run_cli(*JOB, *registry, f"hydra.run.dir={tmp / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    nodes = torchrun_nodes(tmp, [[*JOB, *registry, f"hydra.run.dir={tmp / 'two'}"]] * 2)
    for rc, _, err in nodes:
        assert rc == 0, err[-3000:]
    return read_report(tmp / "one"), read_report(tmp / "two")


@pytest.mark.slow  # two torchrun agents and one plain job: ~1 min on 2 cores
def test_two_torchrun_nodes_match_one_process(two_nodes_and_one):
    one, two = two_nodes_and_one
    assert two["train"]["world_size"] == 2 and two["train"]["distributed"]["launcher"] == "torchrun"
    digests = two["train"]["distributed"]["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # every replica bit for bit
    for key in ("sample_rate", "steps", "noise_multiplier"):
        assert two["privacy"][key] == one["privacy"][key]  # the global logical batch: one process's mechanism
    assert two["privacy"]["epsilon"] == pytest.approx(one["privacy"]["epsilon"], rel=1e-12)


@pytest.mark.slow
def test_ranks_that_disagree_on_the_run_dir_are_refused(tmp_path):
    nodes = torchrun_nodes(tmp_path, [[*JOB, f"hydra.run.dir={tmp_path / f'r{i}'}"] for i in range(2)], "t2")
    for rc, _, err in nodes:
        assert rc != 0 and "the ranks of this torchrun job disagree" in err
    assert not (tmp_path / "r0" / "report.json").exists()


def test_run_dir_comes_from_the_rendezvous_id(monkeypatch):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    assert cli_overrides(["train.epochs=1"]) == [
        "hydra.run.dir=outputs/torchrun/job42", "hydra.output_subdir=null", "hydra/job_logging=stdout",
    ]  # fmt: skip
    assert cli_overrides(["hydra.run.dir=/shared/x"]) == ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default --rdzv-id: every job would share it
    with pytest.raises(ConfigError, match=r"^TORCHELASTIC_RUN_ID='none' is not allowed as a run directory"):
        cli_overrides(["train.epochs=1"])
    monkeypatch.delenv("RANK")
    assert cli_overrides(["train.epochs=1"]) == []  # not under torchrun: nothing added


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out] + [c for p in out for c in children(int(p))]


def cmdline(pid: int) -> str:
    """A process's command line; "" once it has exited (pgrep listed it, it ended before we read /proc)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_charges_no_step_twice(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "aisec_train", *JOB, "train.epochs=4", "train.distributed.nproc=2",
               "train.distributed.max_restarts=2", f"audit.registry_path={tmp_path / 'registry.json'}",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    log = (tmp_path / "stderr.txt").open("w+")  # not a pipe: unread until the end, it could fill and stall the job
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [p for p in children(job.pid) if "spawn" in cmdline(p)]
    assert workers, "no worker process found to kill"
    os.kill(workers[-1], signal.SIGKILL)  # after the first checkpoint, mid-training
    job.wait(timeout=600)
    log.seek(0)
    assert job.returncode == 0, log.read()[-3000:]
    report = read_report(run_dir)
    assert report["train"]["epochs_completed"] == 4
    assert "restart 1 of 2 from the last checkpoint" in (run_dir / "cli.log").read_text()  # the kill did land
    ledger = subprocess.run([sys.executable, "-m", "aisec_train.privacy.ledger_cli", "show",
                             report["data"]["manifest_sha256"]],
                            cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert ledger.returncode == 0, ledger.stderr
    charged = int(re.search(r"over (\d+) step", ledger.stdout).group(1))
    assert charged == report["privacy"]["steps"]  # the dataset ledger charged each step once, restart or not
    assert report["privacy"]["epsilon"] <= 50


def test_negative_restarts_are_refused_in_one_line():
    from aisec_train import compose

    with pytest.raises(ConfigError, match=r"train.distributed.max_restarts=-1 is not allowed: must be >= 0"):
        compose(["train.distributed.max_restarts=-1"])


@pytest.mark.slow  # a real nproc=2 launch plus one restart: ~1-3 min on 2 loaded cores
def test_a_rank_killed_while_it_starts_up_is_restarted_not_hung(tmp_path):
    """Killed before it has read its start-up payload: spawn's parent used to block for ever writing the ~0.5 MB job
    into the dead child's pipe (it holds the read end itself until the write returns); the job now goes through a
    file (distributed.JobPayload), so the agent sees the death and the launcher restarts the attempt."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "aisec_train", *JOB, "train.epochs=1", "train.distributed.nproc=2",
               "train.distributed.max_restarts=1", f"audit.registry_path={tmp_path / 'registry.json'}",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    log = (tmp_path / "stderr.txt").open("w+")
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline, workers = time.monotonic() + 300, []
    while not workers and job.poll() is None and time.monotonic() < deadline:
        workers = [p for p in children(job.pid) if "spawn" in cmdline(p)]
        time.sleep(0.05)
    assert workers, "no worker process appeared"
    os.kill(workers[0], signal.SIGKILL)  # the first rank, the moment it exists: still importing, payload unread
    try:
        job.wait(timeout=900)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the launcher hung after a rank died during start-up")
    log.seek(0)
    assert job.returncode == 0, log.read()[-3000:]
    assert "restart 1 of 1 from the last checkpoint" in (run_dir / "cli.log").read_text()
    assert read_report(run_dir)["train"]["epochs_completed"] == 1


def test_the_spawned_ranks_job_goes_through_a_checked_file_not_the_pipe():
    """What spawn's pipe carries must fit its 64 KiB buffer (see the test above); the file must be the one written."""
    import pickle

    from aisec_train.train.distributed import JobPayload

    job = {"data": bytes(range(256)) * 4096}  # 1 MiB, like a data split
    with JobPayload(job) as payload:
        assert len(pickle.dumps(payload.ticket)) < 1024
        assert oct(os.stat(payload.dir).st_mode & 0o777) == "0o700"
        assert JobPayload.load(payload.ticket) == job
        with open(payload.ticket[0], "r+b") as stream:  # one byte changed after the launcher wrote it
            stream.seek(100)
            stream.write(b"\xff")
        with pytest.raises(RuntimeError, match="payload changed after the launcher wrote it"):
            JobPayload.load(payload.ticket)
    assert not os.path.exists(payload.dir)


def test_a_sigterm_to_your_torchrun_charges_rank_zeros_steps_and_each_rank_ends_in_one_line(tmp_path):
    """(~10 s.) A scheduler's SIGTERM to your own torchrun agent: the agent passes it on to every rank, which died
    where it stood (torch's default), so rank 0's steps since its last checkpoint went uncharged. Now each rank
    turns it into the stop a one-process run makes: rank 0 charges every step it took and says so in one line."""
    run = tmp_path / "run"
    ledgers = tmp_path / "ledgers"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AISEC_TRAIN_LEDGER_STORE": str(ledgers)}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "aisec_train", "experiment=smoke", "train.epochs=300", f"hydra.run.dir={run}"]  # fmt: skip
    log = (tmp_path / "stderr.txt").open("w+")  # a file, not a pipe: two ranks and the agent write to it
    agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        signal_past_first_checkpoint(agent, run, signal.SIGTERM)
        agent.wait(timeout=180)
    finally:
        agent.kill()
    log.seek(0)
    text = log.read()
    ours = [line.split("\r")[-1].strip() for line in text.splitlines() if "aisec-train: " in line]
    assert len(ours) == 2, text[-3000:]  # one line a rank; the agent's own report of the signal is torch's
    zero = next(line for line in ours if "(torchrun rank 0 of 2 in epoch " in line)
    assert zero.startswith("aisec-train: stopped by SIGTERM (torchrun rank 0 of 2 in epoch "), zero
    one = "aisec-train: stopped by SIGTERM (torchrun rank 1 of 2: rank 0 charges the job's steps); run the same"
    assert any(line.startswith(one) for line in ours), ours
    assert "/aisec_train/" not in text, text[-3000:]  # no rank's traceback (the agent prints its own SignalException)
    taken = int(zero.split(" with ")[1].split(" private step(s)")[0])
    assert "all charged to the dataset's privacy ledger" in zero
    charged = sum(
        sum(n for _, _, n in record["history"])
        for path in ledgers.glob("*.json")
        for record in json.loads(path.read_text())["records"]
        if record["kind"] == "charge"
    )
    assert charged == taken  # every step rank 0 took, not only those up to its last checkpoint
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # at most: a signal can land just after an epoch's checkpoint (about one run in six here)
    assert sum(n for _, _, n in kept["ledger"]["history"]) <= taken and not (run / "model.pt").exists()


@pytest.mark.parametrize(
    "signalled", [pytest.param(1, id="second-node"), pytest.param(0, id="first-node", marks=pytest.mark.slow)]
)
def test_a_signal_to_one_node_ends_the_other_nodes_rank_in_one_line_with_the_steps_charged(tmp_path, signalled):
    """(~12 s each.) Two torchrun "nodes" on loopback, a SIGTERM to one node's agent only (a node preempted alone,
    or a terminal closed on one machine): that node's rank stops as it should; the other node's rank met the closed
    connection in its next collective, a gloo traceback. It now says in one line that it lost a peer, where, and
    (rank 0) that every step taken is charged. Which node holds rank 0 is the rendezvous' choice: both are checked."""
    run, ledgers = tmp_path / "run", tmp_path / "ledgers"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AISEC_TRAIN_LEDGER_STORE": str(ledgers)}
    env.pop("HYDRA_FULL_ERROR", None)
    port, agents, logs = free_port(), [], []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=one-node-signalled",
                   "-m", "aisec_train", "experiment=smoke", "train.epochs=300", f"hydra.run.dir={run}"]  # fmt: skip
        logs.append((tmp_path / f"node{node}.txt").open("w+"))
        agents.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=logs[-1]))
    try:
        signal_past_first_checkpoint(agents[signalled], run, signal.SIGTERM)
        for agent in agents:
            agent.wait(timeout=180)
    finally:
        for agent in agents:
            agent.kill()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
    other = texts[1 - signalled]
    ours = [line.split("\r")[-1].strip() for line in other.splitlines() if "aisec-train: " in line]
    assert len(ours) == 1 and "/aisec_train/" not in other, other[-3000:]
    assert re.match(r"aisec-train: error: torchrun rank [01] of 2 lost another rank in a collective at step \d+ "
                    r"\(epoch \d+\): its process ended \(", ours[0]), ours  # fmt: skip
    assert "the last good checkpoint is kept and no model is released" in ours[0]
    charged = sum(
        sum(n for _, _, n in record["history"])
        for path in ledgers.glob("*.json")
        for record in json.loads(path.read_text())["records"]
        if record["kind"] == "charge"
    )
    if "torchrun rank 0 of 2 lost" in ours[0]:  # the unsignalled node held rank 0: its line counts the charge
        taken = int(re.search(r"; (\d+) step\(s\) taken, ", ours[0]).group(1))
        assert "all charged to the privacy ledger" in ours[0] and charged == taken, (ours, charged)
    else:
        assert "(rank 0 charges the job's steps unless it was killed)" in ours[0]
        zero = [line for line in texts[signalled].splitlines() if "torchrun rank 0 of 2 in epoch " in line]
        assert zero and f" with {charged} private step(s) taken in all" in zero[0], (zero, charged)


def _signal_one_nproc_rank(
    tmp_path: Path, sig: int, restarts: int, peer_busy: bool = False
) -> tuple[subprocess.Popen, str]:
    """A real ``train.distributed.nproc=2`` job of ``restarts`` restarts; ``sig`` to one spawned rank (not the job)
    past its first checkpoint; returns the ended job and its stderr. ``peer_busy``: the other rank is held (SIGSTOP)
    from before the signal until 2 s after it, as a rank in a long step would be, so that the agent's SIGTERM to it
    after the signalled rank failed comes before it meets the closed connection."""
    run, ledgers = tmp_path / "run", tmp_path / "ledgers"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AISEC_TRAIN_LEDGER_STORE": str(ledgers)}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "aisec_train", "experiment=smoke", "train.epochs=300", "train.distributed.nproc=2",
               f"train.distributed.max_restarts={restarts}", f"hydra.run.dir={run}"]  # fmt: skip
    log = (tmp_path / "stderr.txt").open("w+")
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.pt").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
        workers = [p for p in children(job.pid) if "spawn" in cmdline(p)]
        assert len(workers) == 2, workers
        if peer_busy:
            os.kill(workers[0], signal.SIGSTOP)
        os.kill(workers[-1], sig)
        if peer_busy:
            time.sleep(2)  # the agent polls its ranks every 0.5 s
            os.kill(workers[0], signal.SIGCONT)
        job.wait(timeout=180)
    finally:
        job.kill()
    log.seek(0)
    return job, log.read()


@pytest.mark.slow
def test_a_rank_killed_while_its_peer_is_busy_is_a_failure_not_a_stop(tmp_path):
    """(~14 s; the decision alone is in the default run, test_distributed_edges.py.) One rank SIGKILLed while the
    other is inside a step longer than the agent's 0.5 s monitor interval (held here with SIGSTOP). The agent saw the
    dead rank first and sent the busy one SIGTERM, which that rank reported as a stop before it could meet the closed
    connection: the job ended ``stopped by SIGTERM``, exit 143, and was not restarted, as if somebody had asked it to
    stop. The kill is the failure: with no restart left the job names it in one line, exit 2."""
    job, text = _signal_one_nproc_rank(tmp_path, signal.SIGKILL, restarts=0, peer_busy=True)
    lines = [line.split("\r")[-1].strip() for line in text.splitlines() if "aisec-train: " in line]
    assert job.returncode == 2 and len(lines) == 1 and "Traceback" not in text, text[-3000:]
    assert re.match(r"aisec-train: error: train.distributed.nproc=2: rank [01] was killed by SIGKILL and "
                    r"train.distributed.max_restarts=0 restart\(s\) are used up; ", lines[0]), lines  # fmt: skip
    assert not (tmp_path / "run/model.pt").exists()


def test_a_stop_signal_to_one_rank_alone_stops_the_job_and_is_not_restarted(tmp_path):
    """(~12 s.) SIGTERM to one rank of ``train.distributed.nproc=2`` (not to the job): the rank stops, charged, and
    its peer meets the closed connection. The peer's report of the lost rank is restartable, and it came first by
    rank, so the launcher restarted the job and trained on to the end, exit 0, as if nobody had asked it to stop.
    A stop by any rank now wins over a lost peer: the job ends in the stop's one line, exit 143, with no restart."""
    job, text = _signal_one_nproc_rank(tmp_path, signal.SIGTERM, restarts=1)
    lines = [line.split("\r")[-1].strip() for line in text.splitlines() if "aisec-train: " in line]
    assert job.returncode == 143 and len(lines) == 1 and "Traceback" not in text, text[-3000:]
    assert re.match(r"aisec-train: stopped by SIGTERM \(train.distributed.nproc=2: rank [01][ :]", lines[0]), lines
    assert "restart" not in (tmp_path / "run" / "cli.log").read_text() and not (tmp_path / "run/model.pt").exists()


def test_a_rank_killed_with_no_restart_left_ends_the_job_in_one_line_with_the_steps_charged(tmp_path):
    """(~12 s.) ``train.distributed.nproc=2`` with ``max_restarts=0``: one rank SIGKILLed mid-training (what the
    out-of-memory killer does). The survivor met the closed connection in its next collective and the job ended in
    ``RuntimeError: data-parallel training failed after 0 restart(s)`` and torch's 60-line failure report, exit 1.
    Now the survivor reports the lost peer as a timed-out collective is reported, and the job says in one line which
    rank was killed, by what, and (when the survivor is rank 0) that every step it took is charged."""
    run, ledgers = tmp_path / "run", tmp_path / "ledgers"
    job, text = _signal_one_nproc_rank(tmp_path, signal.SIGKILL, restarts=0)
    lines = [line.split("\r")[-1].strip() for line in text.splitlines() if "aisec-train: " in line]
    assert job.returncode == 2 and len(lines) == 1 and "Traceback" not in text, text[-3000:]
    line = lines[0]
    assert re.match(r"aisec-train: error: train.distributed.nproc=2: rank [01] of 2 lost another rank in a "
                    r"collective at step \d+ \(epoch \d+\): its process ended \(", line), line  # fmt: skip
    assert re.search(r"\(rank [01] was killed by SIGKILL; train.distributed.max_restarts=0 restart\(s\) used up\)$",
                     line), line  # fmt: skip
    charged = sum(
        sum(n for _, _, n in record["history"])
        for path in ledgers.glob("*.json")
        for record in json.loads(path.read_text())["records"]
        if record["kind"] == "charge"
    )
    if "rank 0 of 2 lost" in line:  # rank 0 survived: every step it took is charged
        assert charged == int(re.search(r"; (\d+) step\(s\) taken, all charged ", line).group(1)), (line, charged)
    else:  # rank 0 was killed outright: what it charged at its last epoch's end stays
        assert "(rank 0 charges the job's steps unless it was killed)" in line and charged > 0
    assert not (run / "model.pt").exists()

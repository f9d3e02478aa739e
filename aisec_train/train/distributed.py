"""Data-parallel training: every rank runs the one training loop, launched by torch's elastic agent.

Two ways in, one path: under ``torchrun`` (any number of nodes; train/launch.py) each process is already a rank
and trains in place; with ``train.distributed.nproc=N`` the job launches N local ranks through
``torch.distributed.launcher.api.elastic_launch`` (torchrun's own launcher: c10d rendezvous on 127.0.0.1,
``train.distributed.max_restarts`` elastic restarts). Each rank joins the ``env://`` process group (NCCL, one GPU
per local rank, on CUDA; gloo on the CPU), builds the model from the same factory and calls
:func:`aisec_train.train.loop.train`, which wraps the model in Opacus' ``DifferentiallyPrivateDistributedDataParallel``
(or torch's DDP without DP). Under DP there is one privacy ledger for the whole job: Opacus' distributed Poisson
sampler draws each sample of the *whole* training split with rate ``batch_size / N`` (each rank owns a shard),
only rank 0 adds the noise, and the clipped sums are all-reduced, so the accountant sees exactly the
single-process mechanism. Rank 0 writes the checkpoints and the result; every rank's weight digest is recorded.
A restarted rank resumes from the last verified checkpoint (whose ledger already holds every step it charged).
``train.distributed.strategy=fsdp`` shards the model instead of replicating it (train/sharding.py): the same
ledger and noise, every rank evaluates, and checkpoints and the result are gathered to full tensors. A
several-task submitit job (SLURM) is a torchrun job too: each task is one rank (train/launch.py).
Multi-node jobs: docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from aisec_train.data.errors import DataError
from aisec_train.errors import STOP_SIGNALS, ConfigError, Stopped, stop_on_signals
from aisec_train.hashing import tensor_bytes
from aisec_train.privacy.engine import quiet_known_warnings
from aisec_train.privacy.ledger import BudgetExhausted, PrivacyLedger
from aisec_train.store.errors import BudgetError
from aisec_train.store.files import atomic_write
from aisec_train.train import checkpoint
from aisec_train.train.allocator import keep_freed_memory
from aisec_train.train.callbacks import Callback, NonFiniteError
from aisec_train.train.config import DistributedConfig
from aisec_train.train.launch import check_same_job, job_view, under_torchrun
from aisec_train.train.loop import TrainResult, train
from aisec_train.train.objectives import objective_from_config

if TYPE_CHECKING:
    from aisec_train.train.job import TrainJob

log = logging.getLogger("aisec_train")

# Refusals a worker reports back by name, so the parent raises the same one-line error the CLI prints. BudgetError:
# the dataset's budget refuses in rank 0's loop (privacy/spend.py's admission); it was an elastic traceback, exit 1.
REFUSALS = {
    cls.__name__: cls
    for cls in (BudgetExhausted, BudgetError, checkpoint.CheckpointError, DataError, ConfigError, NonFiniteError)
}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's tensors in key order: equal on every rank iff the replicas agree bit for bit."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_bytes(value))
    return digest.hexdigest()


def train_distributed(job: TrainJob) -> TrainResult:
    """Train ``job`` data-parallel; return rank 0's result (under torchrun, this rank's)."""
    if under_torchrun():
        return _train_in_place(job)
    cfg = job.cfg.train.distributed
    if job.device.type == "cuda" and cfg.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"train.distributed.nproc={cfg.nproc} is not allowed: this node has {torch.cuda.device_count()} GPU(s)"
        )
    _check_port(cfg.port)
    backend = _backend(cfg.backend, job.device)
    tracker = job.extras.get("tracker")
    extras = {k: v for k, v in job.extras.items() if k != "tracker"}  # tracker clients stay in this process
    portable = dataclasses.replace(job, objective=None, extras=extras)  # objective rebuilt per rank: closures
    outcome = _elastic_launch(cfg, portable, backend, tracked=bool(tracker))
    if outcome.get("refusal"):
        raise REFUSALS[outcome["refusal"]](outcome["message"])
    if outcome.get("stopped"):  # SIGTERM/SIGINT: the ranks stopped, rank 0 having charged every step it took
        stopped, rank = Stopped(outcome["stopped"]), outcome.get("rank", 0)
        said = outcome["where"] or (" stopped outside training" if rank == 0 else ": rank 0 charges the job's steps")
        stopped.where = f" (train.distributed.nproc={cfg.nproc}: rank {rank}{said})"
        raise stopped
    if tracker:
        for values, step, axis in outcome.get("tracking", []):  # rank 0's per-step values, logged here
            tracker.log_metrics(values, step, axis)
    return _result(job, outcome, cfg.nproc, backend, "elastic_launch")


def _backend(name: str, device: torch.device) -> str:
    """``train.distributed.backend`` on this device; NCCL on the CPU was every rank's traceback, exit 1."""
    if name == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"train.distributed.backend='nccl' is not allowed on {device.type}: NCCL reduces CUDA tensors only; "
            "allowed: auto or gloo (or train.device=cuda)"
        )
    return name if name != "auto" else ("nccl" if device.type == "cuda" else "gloo")


def _elastic_launch(cfg, job: TrainJob, backend: str, tracked: bool) -> dict[str, Any]:
    """``nproc`` local ranks through torch's elastic agent, as ``torchrun --standalone --nproc-per-node`` would;
    returns the outcome the ranks reported (:func:`_reported`: rank 0's result, or a refusal).

    A rank that dies ends the attempt; up to ``max_restarts`` new attempts follow, each a fresh rendezvous whose
    ranks resume from the last checkpoint (:func:`_latest_resume`). Fresh, because gloo could hang re-forming its
    mesh inside the agent's own restart on the same store (seen with torch 2.14 on loopback).

    Rank 0 hands its outcome back through the payload's private folder, removed with it: it used to be
    ``checkpoints/distributed_result.pt`` in the run directory, left behind by every run, a refused one too (holding
    only the refusal), where a one-process run refused at the same point leaves no ``checkpoints/`` at all."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with JobPayload(job) as payload:  # removed once every attempt is over
        result_path = os.path.join(payload.dir, "result.pt")
        failure: Exception | None = None
        for attempt in range(cfg.max_restarts + 1):
            config = LaunchConfig(
                min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc, run_id=f"aisec-{uuid.uuid4().hex[:12]}",
                rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{cfg.port or _free_port()}",
                rdzv_configs={"is_host": True}, max_restarts=0, monitor_interval=0.5, start_method="spawn",
            )  # fmt: skip
            for rank in range(cfg.nproc):  # a timeout an earlier attempt reported
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_rank_report(result_path, rank))
            try:
                with _agent_logs_held():
                    elastic_launch(config, _elastic_worker)(payload.ticket, backend, result_path, tracked)
            except Exception as err:  # ChildFailedError: a rank died (killed, out of memory, a bug)
                _end_the_line_of_a_killed_bar(err)
                outcome = _failed_attempt(result_path, cfg.nproc, err)
                if outcome is not None and outcome.get("stopped"):  # a signal, not a failure: no restart
                    return outcome
                last = attempt == cfg.max_restarts
                if outcome is not None and (last or not _restartable(outcome)):
                    # a refusal ends the job; a stalled rank, or one whose peer died, is restarted like a dead one
                    return _with_cause(outcome, err, cfg.max_restarts) if _restartable(outcome) else outcome
                failure = err
                if not last:
                    log.warning("a data-parallel rank failed; restart %d of %d from the last checkpoint", attempt + 1,
                                cfg.max_restarts)  # fmt: skip
                continue
            return _reported(result_path, cfg.nproc) or checkpoint.load(result_path)
        died = _killed(failure)
        if died is not None:  # a rank killed by a signal (the out-of-memory killer's SIGKILL), none reporting
            raise ConfigError(
                f"train.distributed.nproc={cfg.nproc}: {died} and train.distributed.max_restarts="
                f"{cfg.max_restarts} restart(s) are used up; every step charged before stays charged (a SIGKILL of "
                "rank 0 leaves those since its last epoch's end uncharged). Run the same command with the same "
                "hydra.run.dir to resume from the last checkpoint, or raise train.distributed.max_restarts"
            ) from None
        raise RuntimeError(f"data-parallel training failed after {cfg.max_restarts} restart(s): {failure}") from None


def _restartable(report: dict[str, Any]) -> bool:
    """A rank's report of a stalled or vanished peer: a symptom of another rank's failure, not a refusal of its own."""
    return bool(report.get("collective_timeout") or report.get("lost_peer"))


def _signalled(err: BaseException | None) -> tuple[int, Any] | None:
    """``(rank, failure)`` when the attempt's first failure is a rank a signal ended (exit code -N); None otherwise
    (a rank that exited with a status raised an error of its own)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not isinstance(err, ChildFailedError):
        return None
    rank, failure = err.get_first_failure()
    return (rank, failure) if failure.exitcode < 0 else None


def _killed(err: BaseException | None) -> str | None:
    """``rank R was killed by SIGNAME`` when a signal ended the attempt's first failed rank; None otherwise (its
    traceback stays the report)."""
    first = _signalled(err)
    return None if first is None else f"rank {first[0]} was killed by {first[1].signal_name()}"


def _end_the_line_of_a_killed_bar(err: BaseException) -> None:
    """Rank 0 draws the progress bar; killed by a signal, it leaves the bar's line open, and the job's own line
    (or the next attempt's bar) was written at its end: end that line first."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(err, ChildFailedError) and 0 in err.failures and err.failures[0].exitcode < 0:
        with contextlib.suppress(OSError):  # a terminal that is gone (EIO) must not stop the restart
            print(file=sys.stderr, flush=True)


def _failed_attempt(result_path: str, world: int, err: BaseException) -> dict[str, Any] | None:
    """What the ranks of a failed attempt reported (:func:`_reported`), less a stop that is the agent's cleanup: a
    rank killed outright (SIGKILL, SIGSEGV) while its peer was inside a step longer than the agent's monitor
    interval; the agent's SIGTERM reached the peer before the closed connection did, and the peer reported a stop.
    The kill is the failure (restarted, or named once restarts are used up), not a request to stop."""
    outcome = _reported(result_path, world)
    first = _signalled(err)  # a rank that stopped exits 128 + N, not -N
    if outcome is not None and outcome.get("stopped") and first is not None and -first[1].exitcode not in STOP_SIGNALS:
        return None
    return outcome


def _with_cause(outcome: dict[str, Any], err: BaseException, restarts: int) -> dict[str, Any]:
    """The last attempt's restartable report, with the rank that died and the restarts used up."""
    died = _killed(err)
    cause = f" ({died}; train.distributed.max_restarts={restarts} restart(s) used up)" if died else ""
    return {**outcome, "message": outcome["message"] + cause}


def _rank_report(result_path: str, rank: int) -> str:
    """Where a rank writes its outcome: rank 0 its result or refusal, another rank only a refusal of its own."""
    return result_path if rank == 0 else f"{result_path}.rank{rank}"


def _reported(result_path: str, world: int) -> dict[str, Any] | None:
    """The outcome the ranks reported: the first refusal by rank that is not a symptom of another rank's failure (a
    rank that refused alone leaves the others waiting in their next collective until it runs out, or, once it
    exits, meeting its closed connection). Else what happened first, by time, of a stop and such a symptom: a signal
    to one rank alone stops the job (its peer's later report of the lost rank would have restarted it), while the
    agent's own SIGTERM to the ranks left after one failed is not a stop. Else rank 0's, else any rank's; None when
    no rank reported (a rank died). Among several of a kind the lowest rank's: rank 0's says what it charged."""
    reports = [checkpoint.load(p) for r in range(world) if os.path.exists(p := _rank_report(result_path, r))]
    refusals = [r for r in reports if r.get("refusal") and not _restartable(r)]
    stops = [r for r in reports if r.get("stopped")]
    symptoms = [r for r in reports if _restartable(r)]
    first = min(stops + symptoms, key=lambda r: r.get("time", 0.0), default=None)
    kind = stops if first is not None and first.get("stopped") else symptoms
    return (refusals or kind or reports or [None])[0]


@contextlib.contextmanager
def _agent_logs_held():
    """torch's elastic agent logs, from this process, every failed rank's traceback and each rank it stops
    (``Terminating process ... via SIGTERM``) at ERROR and WARNING: a rank that refused in one line, or whose
    collective timed out, ended the job in some 60 lines. Its ``ChildFailedError`` carries the root cause's
    traceback, which a failure no rank reported still ends with."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


class JobPayload:
    """The pickled job, handed to each spawned rank through a private file rather than through spawn's pipe.

    Why: Python's spawn writes a child's start-up payload into a pipe while the parent itself still holds the
    pipe's read end, and only closes it once the write returns. The job (its data split) is ~0.5 MB, past the 64 KiB
    pipe buffer, so a rank killed before it had read it all left that write, and the launcher, blocked for ever.
    The ticket sent through the pipe is ~200 bytes. The file sits in a 0700 directory of its own, and a rank checks
    its SHA-256 against the ticket before unpickling it."""

    def __init__(self, job: TrainJob):
        self.job = job

    def __enter__(self) -> JobPayload:
        import pickle
        import tempfile

        data = pickle.dumps(self.job, protocol=pickle.HIGHEST_PROTOCOL)
        self.dir = tempfile.mkdtemp(prefix="aisec-launch-")
        path = os.path.join(self.dir, "job.pkl")
        atomic_write(path, data, root=self.dir, perms=0o600, sync_dir=False)  # a fresh private folder, read at once
        self.ticket = (path, hashlib.sha256(data).hexdigest())
        return self

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def load(ticket: tuple[str, str]) -> TrainJob:
        import pickle

        path, expected = ticket
        with open(path, "rb") as stream:
            data = stream.read()
        if hashlib.sha256(data).hexdigest() != expected:
            raise RuntimeError(f"{path}: the launched job's payload changed after the launcher wrote it")
        return pickle.loads(data)  # noqa: S301 - written moments ago by this job's launcher, digest checked


def _check_port(port: int) -> None:
    """``train.distributed.port``: the rendezvous binds it on 127.0.0.1. One that another process holds (or this
    user may not bind) was an elastic traceback, exit 1; now one line before any rank starts or any step is charged.
    The probe binds as torch's store does (``SO_REUSEADDR``), so a port a finished run left in TIME_WAIT passes."""
    if not port:
        return
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise ConfigError(
                f"train.distributed.port={port} is not allowed: 127.0.0.1:{port} cannot be bound ({err.strerror}); "
                "allowed: a free port, or 0 (a free one for each attempt)"
            ) from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _elastic_worker(ticket: tuple[str, str], backend: str, result_path: str, tracked: bool) -> None:
    """One local rank of an ``elastic_launch``: join the env:// group, train, rank 0 writes the outcome."""
    quiet_known_warnings()  # a spawned process starts with fresh warning filters
    # tqdm's default lock is a multiprocessing semaphore, made even for a disabled bar: a rank the agent stops with
    # SIGTERM (the others, once one failed) left it behind, and the job's resource tracker warned of it in 2 lines
    # after the job's own. The ranks share no bar, so a thread lock serves.
    tqdm.set_lock(threading.RLock())
    job = JobPayload.load(ticket)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    if job.cfg.train.keep_freed_memory:  # a spawned rank starts with malloc's defaults (train/allocator.py)
        keep_freed_memory()
    report = _rank_report(result_path, rank)
    try:
        device = _join(backend, job.device, job.cfg.train.distributed.timeout, nproc=world)
    except ConfigError as err:  # the rendezvous timed out (a rank slow to start): it was the agent's traceback
        checkpoint.save({"refusal": type(err).__name__, "message": str(err)}, report)
        return
    progress = _Progress()
    try:
        job = dataclasses.replace(job, resume=_latest_resume(job))  # after an elastic restart: the last checkpoint
        # The agent stops the ranks with SIGTERM when it is stopped itself (a scheduler's preemption, Ctrl-C): as
        # Stopped, rank 0's loop charges every step it took before the rank exits (train/loop.py), not only those
        # up to its last checkpoint, and the job ends in one line.
        with stop_on_signals():
            outcome = _train_rank(rank, device, job, tracked, progress=progress)
        if rank == 0:
            checkpoint.save(outcome, result_path)
    except Stopped as err:
        checkpoint.save({"stopped": err.signum, "where": err.where, "rank": rank, "time": time.time()}, report)
        raise SystemExit(128 + err.signum) from None
    except tuple(REFUSALS.values()) as err:  # every rank refuses at the same point, or one alone (its own file)
        checkpoint.save({"refusal": type(err).__name__, "message": str(err)}, report)
    except (RuntimeError, dist.DistError) as err:
        if _timed_out(err):
            line = progress.timed_out(job, rank, world, err)
            timed_out = {"refusal": "ConfigError", "message": line, "collective_timeout": True, "time": time.time()}
            checkpoint.save(timed_out, report)
        elif _lost_peer(err):  # another rank died (killed, out of memory): restarted as the dead one is
            then = "Run the same command with the same hydra.run.dir to resume from the last checkpoint"
            line = progress.lost_peer(rank, world, err, f"train.distributed.nproc={world}: rank", then)
            checkpoint.save({"refusal": "ConfigError", "message": line, "lost_peer": True, "time": time.time()}, report)
        else:
            raise
        raise SystemExit(1) from None  # not 0: the agent stops the other ranks (the one that stalled may never return)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _timed_out(err: BaseException) -> bool:
    """Whether torch gave up waiting for another rank: gloo's ``Timed out waiting 5000ms for recv``, the store's
    ``wait timeout after 1000ms``, NCCL's watchdog."""
    text = str(err).lower()
    ours = isinstance(err, dist.DistError) or "gloo" in text or "nccl" in text  # not a data loader's own timeout
    return ours and ("timed out" in text or "timeout" in text)


class _Progress(Callback):
    """Rank 0's training loop as it goes (a callback sees it), so a collective that times out part-way through an
    epoch is answered with what was taken and charged: the dataset ledger is charged at each epoch's end, and the
    steps since then were spent too (their noisy sums all-reduced), though no checkpoint or model holds them."""

    def __init__(self) -> None:
        self.loop = None
        self.spend = None

    def on_train_start(self, loop) -> None:
        self.loop = loop

    def timed_out(self, job: TrainJob, rank: int, world: int, err: BaseException) -> str:
        """Charge the steps taken (rank 0: the one ledger) and say in one line where training stopped."""
        timeout = job.cfg.train.distributed.timeout
        return (
            f"train.distributed.timeout={timeout:g} ran out: rank {rank} of {world} waited {timeout:g} s in a "
            f"collective{self._where()} for a rank that did not come ({_first_line(err)}); training "
            f"stopped{self._charged(rank)}; the last good checkpoint is kept and no model is released. Check the rank "
            "that stalled (its data, file system or device), or raise train.distributed.timeout (allowed: 1 to 86400 s)"
        )

    def lost_peer(self, rank: int, world: int, err: BaseException, who: str = "torchrun rank", then: str = "") -> str:
        """The same line when another rank's process ended under a collective (a signal or a failure on its node
        alone, the out-of-memory killer): this rank's traceback, gloo's ``Connection reset by peer``, told nothing
        of what was charged. A rank 0 killed by SIGKILL cannot answer it: it charged nothing since its last epoch's
        end."""
        charged = self._charged(rank) if rank == 0 else " (rank 0 charges the job's steps unless it was killed)"
        return (
            f"{who} {rank} of {world} lost another rank in a collective{self._where()}: its process ended "
            f"({_first_line(err)}); training stopped{charged}; the last good checkpoint is kept and no model is "
            f"released. {then or _TORCHRUN_THEN}"
        )

    def _where(self) -> str:
        loop = self.loop
        return f" at step {loop.steps + 1} (epoch {loop.epoch + 1})" if loop is not None else ""

    def _charged(self, rank: int) -> str:
        loop = self.loop
        if rank != 0 or loop is None or loop.ledger is None:
            return ""
        if self.spend is not None:
            self.spend.charge(loop.ledger)  # never less than what was spent: the ledger's steps, all of them
            return f"; {loop.ledger.steps} step(s) taken, all charged to the privacy ledger"
        return f"; {loop.ledger.steps} step(s) taken"


_TORCHRUN_THEN = (
    "See the other nodes' output for why, then run the same command with the same hydra.run.dir on every node to "
    "resume from the last checkpoint"
)


def _first_line(err: BaseException) -> str:
    """torch's collective error without its source-file prefix: ``Read error [127.0.0.1]:5541: Connection reset by
    peer. This is typically ...`` up to its first sentence's end."""
    return str(err).splitlines()[0].split("] ", 1)[-1].split(". ")[0]


def _lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another rank's process ended: gloo's ``Connection reset by peer`` or
    ``Connection closed by peer``, a broken pipe, NCCL's ``remote process exited``."""
    text = str(err).lower()
    ours = isinstance(err, dist.DistError) or "gloo" in text or "nccl" in text
    gone = ("connection reset by peer", "connection closed by peer", "broken pipe", "remote process exited")
    return ours and any(marker in text for marker in gone)


def _join(
    backend: str, device: torch.device, timeout: float = DistributedConfig.timeout, nproc: int | None = None
) -> torch.device:
    """Join the ``env://`` process group; ``timeout`` (``train.distributed.timeout``) bounds the rendezvous and every
    collective after it. ``nproc``: a local rank of ``train.distributed.nproc`` (this job set the variables)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return device
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    with _HeldStderr() as held:
        try:
            dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout))
        except (dist.DistError, RuntimeError) as err:  # gloo's full mesh: RuntimeError("... timed out connecting")
            if not _timed_out(err):
                if not isinstance(err, dist.DistNetworkError):
                    raise
                # MASTER_PORT taken on rank 0's host, or unreachable: was a traceback
                raise ConfigError(
                    f"MASTER_PORT={os.environ.get('MASTER_PORT')} is not allowed: rank {os.environ.get('RANK')} could "
                    f"not open the rendezvous store at {where} ({str(err).splitlines()[0]}); allowed: a port that is "
                    "free on MASTER_ADDR and reachable from every node (torchrun's c10d rendezvous picks one)"
                ) from None
            held.discard()  # torch's C++ log of each retry, a backtrace included: the line below says it all
            if nproc is not None:  # a rank that started late (spawn imports torch and loads the job, one by one)
                raise ConfigError(
                    f"train.distributed.timeout={timeout:g} ran out: rank {os.environ.get('RANK')} of the {nproc} "
                    f"local ranks of train.distributed.nproc={nproc} waited {timeout:g} s at the rendezvous and not "
                    f"every rank joined ({str(err).splitlines()[0].split('] ')[-1]}); nothing was trained or charged. "
                    "Each rank starts a Python process, imports torch and loads the job first, which on a busy "
                    "machine can take longer: raise train.distributed.timeout (allowed: 1 to 86400 s)"
                ) from None
            # A stale shell's RANK=1 WORLD_SIZE=2 with no rank 0 anywhere waited torch's 30 minutes, then a traceback.
            raise ConfigError(
                f"train.distributed.timeout={timeout:g} ran out: rank {os.environ.get('RANK')} of "
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} waited {timeout:g} s at the rendezvous at "
                f"MASTER_ADDR:MASTER_PORT={where} and not every rank joined ({str(err).splitlines()[0]}); check that "
                "every rank was started with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, that rank 0 is up and "
                "reachable there, or raise train.distributed.timeout; a shell that still exports torchrun's "
                "variables: unset RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to train in one process"
            ) from None
    return device


class _HeldStderr:
    """File descriptor 2 held in a private file while the process group forms, written back afterwards unless
    :meth:`discard` was called. Why: torch's C++ TCPStore client logs every failed connection attempt, with a C++
    backtrace, straight to fd 2, so a rendezvous that times out printed dozens of lines ahead of the refusal."""

    def __enter__(self) -> _HeldStderr:
        import tempfile

        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        self.keep = True
        return self

    def discard(self) -> None:
        self.keep = False

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        with self.file:
            self.file.seek(0)
            held = self.file.read() if self.keep else b""
        while held:
            held = held[os.write(2, held) :]


def _latest_resume(job: TrainJob) -> dict[str, Any] | None:
    """The newest verified checkpoint of the run (rank 0 wrote it before a worker died), else the job's own."""
    path = job.run_dir / "checkpoints" / "last.pt"
    if not path.exists():
        return job.resume
    payload = checkpoint.load(path, root=job.run_dir)
    if job.resume is not None and payload.get("epoch", 0) <= job.resume.get("epoch", 0):
        return job.resume
    return payload


def _train_in_place(job: TrainJob) -> TrainResult:
    """Under torchrun: this process is one rank; every rank returns its result (rank 0's goes on to the report)."""
    cfg = job.cfg.train.distributed
    backend = _backend(cfg.backend, job.device)
    device = _join(backend, job.device, cfg.timeout)
    progress = _Progress()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        check_same_job(str(job.run_dir), job_view(job.cfg, job.data.manifest_sha256))  # before any step or charge
        outcome = _train_rank(rank, device, job, tracked=False, objective=job.objective, progress=progress)
    except Stopped as err:  # the agent passed a scheduler's SIGTERM (or Ctrl-C) to every rank (cli.answers_signals)
        said = err.where if rank == 0 else ": rank 0 charges the job's steps"  # the one ledger is rank 0's
        err.where = f" (torchrun rank {rank} of {world}{said or ' outside training'})"
        raise
    except (RuntimeError, dist.DistError) as err:  # a stalled or vanished peer was torch's traceback: one line,
        if isinstance(err, NonFiniteError):  # with what was charged, as under nproc
            raise
        if _timed_out(err):
            raise ConfigError(progress.timed_out(job, rank, world, err)) from None
        if _lost_peer(err):  # only the other node was signalled or failed: its own output says why
            raise ConfigError(progress.lost_peer(rank, world, err)) from None
        raise
    finally:
        dist.destroy_process_group()
    launcher = "submitit" if os.environ.get("SUBMITIT_EXECUTOR") else "torchrun"  # each task a rank: launch.py
    return _result(job, outcome, world, backend, launcher)


def _result(job: TrainJob, outcome: dict[str, Any], world: int, backend: str, launcher: str) -> TrainResult:
    """A rank's outcome (weights, ledger state, history) as the ``TrainResult`` the other stages read."""
    model = job.factory()
    model.load_state_dict(outcome["model"])
    ledger = None
    if outcome["ledger"] is not None:
        ledger = PrivacyLedger(outcome["ledger"]["accountant"], outcome["ledger"]["delta"])
        ledger.load_state_dict(outcome["ledger"])
    result = TrainResult(model, ledger, outcome["history"], outcome["stopped_by_budget"], outcome["grad_sample_mode"])
    result.world_size = world
    result.private_step = outcome.get("private_step")
    result.distributed = {**outcome["distributed"], "backend": backend, "launcher": launcher}
    return result


def _train_rank(
    rank: int, device: torch.device, job: TrainJob, tracked: bool, objective=None, progress: _Progress | None = None
) -> dict[str, Any]:
    """This rank's share of the job; returns the outcome (model, ledger, history, every rank's digest)."""
    from aisec_train.tracking.callback import StepBuffer, StepLogger, step_loggers
    from aisec_train.train.sharding import gathered, is_sharded, shard_digest

    cfg = job.cfg
    sharded = cfg.train.distributed.strategy == "fsdp"  # every rank joins each forward pass (evaluation too)
    model = job.factory(seed=cfg.train.seed)  # same initial weights everywhere (DPDDP broadcasts rank 0's anyway)
    buffer = StepBuffer() if tracked and rank == 0 else None  # the job's process logs it (elastic launch)
    every = (cfg.logger.every_n_steps, cfg.logger.epsilon_every_n_steps)
    callbacks = [StepLogger(buffer, *every)] if buffer is not None else step_loggers(job)
    if progress is not None:
        progress.spend = job.spend if rank == 0 else None
        callbacks = [progress, *callbacks]
    result = train(
        model,
        job.data.training_view(),
        train_cfg=cfg.train,
        privacy_cfg=cfg.privacy,
        device=device,
        objective=objective or objective_from_config(cfg.robustness),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        resume=job.resume,
        eval_dataset=job.data.test if rank == 0 or sharded else None,
        persist=job.persist if rank == 0 else (_discard if sharded else None),  # the gather is a collective
        spend=job.spend if rank == 0 else None,  # one ledger for the whole job: rank 0 charges it
        progress=rank == 0,
        callbacks=callbacks if rank == 0 else [progress] if progress is not None else (),
    )
    state = gathered({k: v.detach().cpu() for k, v in result.model.state_dict().items()})  # full on every rank
    replica = job.factory()
    replica.load_state_dict(state)
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, weights_digest(replica))
    shards: list[str | None] = [None] * dist.get_world_size()
    if is_sharded(result.model):
        dist.all_gather_object(shards, shard_digest(result.model))
    return {
        "model": state,
        "ledger": result.ledger.state_dict() if result.ledger is not None else None,
        "history": result.history,
        "stopped_by_budget": result.stopped_by_budget,
        "grad_sample_mode": result.grad_sample_mode,
        "private_step": result.private_step,  # how per-sample gradients were clipped (the report's private_step)
        "distributed": {"rank_weights_sha256": digests, "strategy": cfg.train.distributed.strategy}
        | ({"rank_shard_sha256": shards} if sharded else {}),
        "tracking": buffer.records if buffer is not None else [],
    }


def _discard(payload: dict[str, Any]) -> None:
    """The checkpoint of a sharded rank other than 0: it joined the gather; rank 0 writes the file."""

"""Data-parallel training: ``train.distributed.nproc`` processes run the one training loop together.

The job spawns the workers (``torch.multiprocessing``); they join a process group on 127.0.0.1 (NCCL, one GPU
each, on CUDA; gloo on the CPU), build the model from the same factory and call
:func:`aisec_train.train.loop.train`, which wraps the model in Opacus' ``DifferentiallyPrivateDistributedDataParallel``
(or torch's DDP without DP). Under DP there is one privacy ledger for the whole job: Opacus' distributed Poisson
sampler draws each sample of the *whole* training split with rate ``batch_size / N`` (each rank owns a shard),
only rank 0 adds the noise, and the clipped sums are all-reduced, so the accountant sees exactly the
single-process mechanism. Rank 0 writes the checkpoints and the result; the parent reads the result back,
verified, and the pipeline goes on as after single-process training. Multi-node jobs: docs/cluster.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aisec_train.data.errors import DataError
from aisec_train.errors import ConfigError
from aisec_train.train import checkpoint
from aisec_train.train.callbacks import NonFiniteError
from aisec_train.train.ledger import BudgetExhausted, PrivacyLedger
from aisec_train.train.loop import TrainResult, train
from aisec_train.train.objectives import objective_from_config
from aisec_train.train.privacy import quiet_known_warnings

if TYPE_CHECKING:
    from aisec_train.train.trainers import TrainJob

# Refusals a worker reports back by name, so the parent raises the same one-line error the CLI prints.
REFUSALS = {
    cls.__name__: cls for cls in (BudgetExhausted, checkpoint.CheckpointError, DataError, ConfigError, NonFiniteError)
}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's tensors in key order: equal on every rank iff the replicas agree bit for bit."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_distributed(job: TrainJob) -> TrainResult:
    """Run ``job`` on ``train.distributed.nproc`` processes; return rank 0's result."""
    cfg = job.cfg.train.distributed
    if job.device.type == "cuda" and cfg.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"train.distributed.nproc={cfg.nproc} is not allowed: this node has {torch.cuda.device_count()} GPU(s)"
        )
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if job.device.type == "cuda" else "gloo")
    port = cfg.port or _free_port()
    result_path = job.run_dir / "checkpoints" / "distributed_result.pt"
    result_path.unlink(missing_ok=True)
    portable = dataclasses.replace(job, objective=None)  # rebuilt in each worker: adversaries are closures
    mp.spawn(_worker, args=(cfg.nproc, backend, port, portable, result_path), nprocs=cfg.nproc, join=True)
    outcome = checkpoint.load(result_path)
    if outcome.get("refusal"):
        raise REFUSALS[outcome["refusal"]](outcome["message"])
    model = job.factory()
    model.load_state_dict(outcome["model"])
    ledger = None
    if outcome["ledger"] is not None:
        ledger = PrivacyLedger(outcome["ledger"]["accountant"], outcome["ledger"]["delta"])
        ledger.load_state_dict(outcome["ledger"])
    result = TrainResult(model, ledger, outcome["history"], outcome["stopped_by_budget"], outcome["grad_sample_mode"])
    result.world_size = cfg.nproc
    result.distributed = {"backend": backend, "rank_weights_sha256": outcome["rank_weights_sha256"]}
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, backend: str, port: int, job: TrainJob, result_path) -> None:
    quiet_known_warnings()  # a spawned process starts with fresh warning filters
    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if job.device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _train_rank(rank, device, job, result_path)
    finally:
        dist.destroy_process_group()


def _train_rank(rank: int, device: torch.device, job: TrainJob, result_path) -> None:
    cfg = job.cfg
    model = job.factory(seed=cfg.train.seed)  # same initial weights everywhere (DPDDP broadcasts rank 0's anyway)
    try:
        result = train(
            model,
            job.data.training_view(),
            train_cfg=cfg.train,
            privacy_cfg=cfg.privacy,
            device=device,
            objective=objective_from_config(cfg.robustness),
            optimizer=cfg.optimizer,
            scheduler=cfg.scheduler,
            resume=job.resume,
            eval_dataset=job.data.test if rank == 0 else None,
            persist=job.persist if rank == 0 else None,
            spend=job.spend if rank == 0 else None,  # one ledger for the whole job: rank 0 charges it
            progress=rank == 0,
        )
    except tuple(REFUSALS.values()) as err:  # every rank refuses at the same point; rank 0 reports it
        if rank == 0:
            checkpoint.save({"refusal": type(err).__name__, "message": str(err)}, result_path)
        return
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, weights_digest(result.model))
    if rank == 0:
        outcome: dict[str, Any] = {
            "model": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
            "ledger": result.ledger.state_dict() if result.ledger is not None else None,
            "history": result.history,
            "stopped_by_budget": result.stopped_by_budget,
            "grad_sample_mode": result.grad_sample_mode,
            "rank_weights_sha256": digests,
        }
        checkpoint.save(outcome, result_path)

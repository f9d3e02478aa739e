"""Three interchangeable trainers behind the pipeline's one train stage.

Each takes the same :class:`TrainJob` (the model factory, the data, the config, the objective, the checkpoint
slot) and returns the same :class:`~aisec_train.train.loop.TrainResult`; all of them run the one loop
(:func:`aisec_train.train.loop.train`), in this process, in ``nproc`` data-parallel processes, or in every Flower
client. :func:`select_trainer` is the one place that picks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aisec_train.train.loop import TrainResult, train
from aisec_train.train.objectives import Objective

if TYPE_CHECKING:
    from aisec_train.config import Config
    from aisec_train.data.dataset import DataBundle
    from aisec_train.models.factory import ModelFactory
    from aisec_train.privacy.spend import DatasetSpend
    from aisec_train.report.report import Report


@dataclass
class TrainJob:
    """What every trainer receives."""

    factory: ModelFactory
    data: DataBundle
    cfg: Config
    device: torch.device
    objective: Objective
    run_dir: Path
    resume: dict[str, Any] | None = None  # a verified checkpoint payload to continue from
    persist: Callable[[dict[str, Any]], None] | None = None  # writes a checkpoint payload (rank 0 / the job)
    extras: dict[str, Any] = field(default_factory=dict)  # trainer-specific inputs (e.g. malicious clients)
    report: Report | None = None  # a trainer with a section of its own (federated) adds it here
    spend: DatasetSpend | None = None  # the dataset-level privacy ledger account (privacy/spend.py), under DP


def central(job: TrainJob) -> TrainResult:
    """One process: the loop on the (augmented) training split."""
    from aisec_train.tracking.callback import step_loggers

    cfg = job.cfg
    model = job.factory(seed=cfg.train.seed)  # the initial weights are part of what the seed reproduces
    return train(
        model,
        job.data.training_view(),
        train_cfg=cfg.train,
        privacy_cfg=cfg.privacy,
        device=job.device,
        objective=job.objective,
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        resume=job.resume,
        eval_dataset=job.data.test,
        persist=job.persist,
        spend=job.spend,
        workers=cfg.dataset.workers,
        callbacks=step_loggers(job),  # the experiment trackers' per-step and per-epoch values
    )


def data_parallel(job: TrainJob) -> TrainResult:
    from aisec_train.train.distributed import train_distributed

    return train_distributed(job)


def federated(job: TrainJob) -> TrainResult:
    from aisec_train.federated.trainer import train_federated

    return train_federated(job)


TRAINERS: dict[str, Callable[[TrainJob], TrainResult]] = {
    "central": central,
    "data_parallel": data_parallel,
    "federated": federated,
}


def select_trainer(cfg: Config) -> str:
    if cfg.federated.mode.value != "none":
        return "federated"
    from aisec_train.train.launch import env_world

    return "data_parallel" if cfg.train.distributed.nproc > 1 or env_world() > 1 else "central"

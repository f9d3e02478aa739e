"""The trainer registry: the three interchangeable trainers behind the train stage, and the one place that picks.

It sits above ``train/`` (central, data-parallel) and ``federated/`` (every Flower client runs the same loop),
so neither package imports the other to be listed: ``train`` never imports ``federated``. Each trainer takes a
:class:`~aisec_train.train.job.TrainJob` and returns a :class:`~aisec_train.train.loop.TrainResult`, whose
``sections`` and ``checks`` carry what the trainer measured beyond the loop (the federated section); the train
stage adds them to the run's report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aisec_train.train.job import TrainJob
from aisec_train.train.launch import env_world
from aisec_train.train.loop import TrainResult
from aisec_train.train.trainers import central, data_parallel

if TYPE_CHECKING:
    from aisec_train.config import Config

__all__ = ["TRAINERS", "TrainJob", "select_trainer"]


def federated(job: TrainJob) -> TrainResult:
    """Every Flower client runs the loop on its partition (federated/trainer.py)."""
    # Imported on use: Flower and TenSEAL add ~0.6 s to every run's start, and only a federated run needs them.
    # This registry sits above both packages, so the import points downward (tests/test_import_graph.py).
    from aisec_train.federated.trainer import train_federated

    return train_federated(job)


TRAINERS: dict[str, Callable[[TrainJob], TrainResult]] = {
    "central": central,
    "data_parallel": data_parallel,
    "federated": federated,
}


def select_trainer(cfg: Config) -> str:
    """``federated`` under ``federated.mode``; ``data_parallel`` for ``train.distributed.nproc > 1`` or a
    torchrun rank; else ``central``."""
    if cfg.federated.mode.value != "none":
        return "federated"
    return "data_parallel" if cfg.train.distributed.nproc > 1 or env_world() > 1 else "central"

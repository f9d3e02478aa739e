"""The two trainers this package provides: the loop in this process (:func:`central`) and in ``nproc``
data-parallel processes (:func:`data_parallel`). The federated trainer lives in ``federated/trainer.py``; the
registry that lists all three and picks one is ``aisec_train/trainers.py``, above both packages, so neither
imports the other.

Each takes the same :class:`~aisec_train.train.job.TrainJob` and returns the same
:class:`~aisec_train.train.loop.TrainResult`; all of them run the one loop (:func:`aisec_train.train.loop.train`).
"""

from __future__ import annotations

from aisec_train.train.distributed import train_distributed
from aisec_train.train.job import TrainJob
from aisec_train.train.loop import TrainResult, train

__all__ = ["TrainJob", "central", "data_parallel"]


def central(job: TrainJob) -> TrainResult:
    """One process: the loop on the (augmented) training split."""
    # Imported here: tracking's step logger is a loop callback (tracking -> train), so train must not import it
    # at module level. A documented function-level import (tests/test_import_graph.py).
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
    """``train.distributed.nproc`` local ranks (or this rank, under torchrun), each running the loop."""
    return train_distributed(job)

"""What every trainer receives: :class:`TrainJob`. Its own module, below the trainers and data-parallel training
alike, so both can name it without importing each other (train/trainers.py, train/distributed.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aisec_train.train.objectives import Objective

if TYPE_CHECKING:
    from aisec_train.config import Config
    from aisec_train.data.dataset import DataBundle
    from aisec_train.models.factory import ModelFactory
    from aisec_train.privacy.spend import DatasetSpend


@dataclass
class TrainJob:
    """The model factory, the data, the config, the objective and the checkpoint slot of one run's training.

    A trainer returns a :class:`~aisec_train.train.loop.TrainResult`; what it measured beyond the loop's result
    (the federated sections) travels in that result, never written into the run's report by the trainer.
    """

    factory: ModelFactory
    data: DataBundle
    cfg: Config
    device: torch.device
    objective: Objective
    run_dir: Path
    resume: dict[str, Any] | None = None  # a verified checkpoint payload to continue from
    persist: Callable[[dict[str, Any]], None] | None = None  # writes a checkpoint payload (rank 0 / the job)
    extras: dict[str, Any] = field(default_factory=dict)  # trainer-specific inputs (e.g. malicious clients)
    spend: DatasetSpend | None = None  # the dataset-level privacy ledger account (privacy/spend.py), under DP

"""One run's state as it goes through the pipeline: typed slots, each filled by the stage that produces it.

``slots=True``: a stage cannot add an attribute on the fly; what a stage hands the next one has a name here.

    cfg, run_dir, report, user       given
    data, factory, spend             data stage (the model factory needs the data's shape and classes; the
                                     dataset-level privacy ledger needs its manifest hash)
    backdoor                         backdoor_poison (the red team's trigger, poisoned rows, trusted data)
    model, result                    train (then backdoor_defend replaces ``model`` by the repaired one)
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from aisec_train.report.report import Report
from aisec_train.tracking.base import Tracker

if TYPE_CHECKING:
    from aisec_train.backdoor.state import BackdoorState
    from aisec_train.config import Config
    from aisec_train.data.dataset import DataBundle
    from aisec_train.models.factory import ModelFactory
    from aisec_train.privacy.spend import DatasetSpend
    from aisec_train.train.loop import TrainResult


@dataclass(slots=True)
class UserObjects:
    """What the Python API was given instead of configs (all optional)."""

    model: nn.Module | None = None
    train: Dataset | None = None
    test: Dataset | None = None


@dataclass(slots=True)
class Run:
    cfg: Config
    run_dir: Path
    experiment: str = "quickstart"
    report: Report = field(default_factory=Report)
    user: UserObjects = field(default_factory=UserObjects)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data: DataBundle | None = None
    factory: ModelFactory | None = None
    spend: DatasetSpend | None = None  # the run's account in the dataset-level privacy ledger (under DP)
    backdoor: BackdoorState | None = None
    model: nn.Module | None = None
    result: TrainResult | None = None
    # the last pass over the test split: (weights digest, clean accuracy, records with non-finite outputs); the
    # evaluate stage reuses it when no stage changed the weights since (train/stage.py measured it)
    test_pass: tuple[str, float, int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tracker: Tracker = field(default_factory=lambda: Tracker([]))  # the experiment trackers (logger group)
    resources: ExitStack = field(default_factory=ExitStack)  # the run directory's and the dataset ledger's locks

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

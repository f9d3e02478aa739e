"""Experiment tracking: the ``logger`` config group fans a run out to CSV, TensorBoard, MLflow and wandb.

    aisec-train logger=tensorboard                 # <run dir>/tensorboard
    aisec-train logger=[csv,mlflow]                # several at once (logger=many: csv, tensorboard, mlflow)
    aisec-train -m logger=mlflow privacy.target_epsilon=1,3,8   # one MLflow experiment for the sweep

One module per backend, :data:`BACKENDS` maps a config key to it, :class:`~aisec_train.tracking.base.Tracker`
fans out. Logged: the flattened config as parameters; per optimizer step the loss, clip fraction and learning
rate, and epsilon spent at each epoch's last step (``logger.epsilon_every_n_steps``;
:class:`~aisec_train.tracking.callback.StepLogger`, a training-loop callback); per epoch (per round, federated)
the history row; at the end the report's headline numbers, and for MLflow the report files,
the model card and ``model.pt`` as artifacts. Only rank 0 of a distributed job logs. MLflow, wandb and TensorBoard
run in a child process (:mod:`~aisec_train.tracking.sidecar`): training queues records and never waits for them.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from aisec_train.errors import ConfigError
from aisec_train.tracking.base import RunInfo, Tracker, flatten, redact
from aisec_train.tracking.context import run_info
from aisec_train.tracking.sidecar import Sidecar, TrackingError

if TYPE_CHECKING:
    from aisec_train.config import Config
    from aisec_train.report.report import Report

# config key -> (module, class, the package it needs, where it runs). "sidecar": in a child process fed through a
# queue (tracking/sidecar.py), so the seconds MLflow, wandb and TensorBoard take to import and start never hold up
# training; "inline": in the training process (the CSV file costs microseconds a row).
BACKENDS: dict[str, tuple[str, str, str | None, str]] = {
    "csv": ("aisec_train.tracking.csv_logger", "CsvBackend", None, "inline"),
    "tensorboard": ("aisec_train.tracking.tensorboard_logger", "TensorBoardBackend", "tensorboard", "sidecar"),
    "mlflow": ("aisec_train.tracking.mlflow_logger", "MlflowBackend", "mlflow", "sidecar"),
    "wandb": ("aisec_train.tracking.wandb_logger", "WandbBackend", "wandb", "sidecar"),
}


def check_installed(cfg: Config) -> None:
    """Refuse, before any work, a logger whose package is missing (one line, exit 2)."""
    for name in cfg.logger.enabled():
        package = BACKENDS[name][2]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"logger={name} is not allowed: the {package} package is not installed "
                "(pip install 'aisec-train[tracking]', or choose another logger)"
            )


def open_tracker(cfg: Config, info: RunInfo, rank: int | None = None) -> Tracker:
    """The run's tracker: every enabled backend on rank 0 (``RANK`` under torchrun), nothing elsewhere. The rank is
    the pipeline's (train/launch.py): a stale ``RANK=1`` without torchrun's other variables is a one-process run
    that charges and reports as rank 0, and it lost its trackers silently (``RANK=abc``: a traceback)."""
    from aisec_train.train.launch import env_rank  # the env:// variables only (no torch)

    rank = env_rank() if rank is None else rank
    if rank != 0:
        return Tracker([])
    check_installed(cfg)
    tracker = Tracker([])
    try:
        for name in cfg.logger.enabled():
            module, cls, package, where = BACKENDS[name]
            backend_cfg, backend_cls = getattr(cfg.logger, name), getattr(importlib.import_module(module), cls)
            if where == "inline":
                tracker.backends.append(backend_cls(backend_cfg, info))
                continue
            backend_cls.check(backend_cfg, info)  # bad paths refused here, before any step (lazy module imports)
            tracker.backends.append(Sidecar(name, module, cls, backend_cfg, info, package))
        tracker.log_params(redact(flatten(cfg)))  # no URL's credentials reach a tracker
    except BaseException:
        tracker.close(ok=False)  # the children already started end their runs as failed
        raise
    return tracker


@contextmanager
def tracking(cfg: Config, info: RunInfo, rank: int | None = None) -> Iterator[Tracker]:
    """The tracker for the length of a run; a run that raises is closed as failed."""
    tracker = open_tracker(cfg, info, rank)
    try:
        yield tracker
    except BaseException:
        tracker.close(ok=False)
        raise
    failed_mid_run = bool(tracker.failures)
    try:
        tracker.close(ok=True)
    except TrackingError as err:
        if not failed_mid_run:
            raise
        # a tracker dropped mid-run: the run itself went on and wrote everything, which exit status 2 alone hides
        raise TrackingError(f"{err}; the run itself finished: its report and model are in {info.run_dir}") from None


def finish_tracking(tracker: Tracker, report: Report, run_dir: Path) -> None:
    """At the end of a run: the report's headline numbers, and its files and model (MLflow artifacts)."""
    if tracker:
        from aisec_train.tracking.headline import headline, run_files

        tracker.finish(headline(report), run_files(run_dir))


__all__ = [
    "BACKENDS",
    "RunInfo",
    "Tracker",
    "TrackingError",
    "check_installed",
    "finish_tracking",
    "flatten",
    "open_tracker",
    "run_info",
    "tracking",
]

"""``logger=wandb``: offline by default (a local run under ``<run dir>/wandb``, uploaded later by ``wandb sync``).

Each axis has its own x-axis metric (``step``, ``epoch``, ``round``), so per-epoch values are not forced onto
wandb's one monotonic step; a multirun's jobs share a group named after the sweep directory. Runs in the tracking
child process (tracking/sidecar.py): wandb's import and its service's start-up (seconds) never hold up training.
wandb 0.31 has no service-less mode any more (``x_disable_service`` is gone), hence the child process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aisec_train.store import validate_output_path
from aisec_train.tracking.base import RunInfo, check_output_path
from aisec_train.tracking.config import WandbLoggerConfig


def SETTINGS():  # noqa: N802 - a constant, built late (wandb imports lazily)
    import wandb

    # symlink=False: no latest-run / debug.log links in the run directory (aisec-train refuses any symlink there);
    # silent, console off: the job's own end-of-run summary stays the last thing printed.
    return wandb.Settings(symlink=False, silent=True, console="off", x_disable_stats=True, disable_git=True)


class WandbBackend:
    name = "wandb"
    package = "wandb"

    @staticmethod
    def check(cfg: WandbLoggerConfig, info: RunInfo) -> None:
        """Before any work, creating nothing (the folder is made when the first figure is written)."""
        check_output_path(info.run_dir / "wandb" / "run", info.run_dir, "logger.wandb")

    def __init__(self, cfg: WandbLoggerConfig, info: RunInfo):
        import wandb

        validate_output_path(info.run_dir / "wandb" / "run", root=info.run_dir, what="logger.wandb")  # made here
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group or info.group, name=info.run_name,
            dir=str(info.run_dir), mode=cfg.mode, job_type=info.experiment, tags=list(info.tags.values()),
            reinit="create_new", settings=SETTINGS(),
        )  # fmt: skip
        self.axes: set[str] = set()

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, values: dict[str, float], step: int, axis: str, wall_time: float | None = None) -> None:
        # wall_time unused: wandb stamps each row itself and has no public way to back-date one
        if axis not in self.axes:
            self.axes.add(axis)
            self.run.define_metric(axis)
            self.run.define_metric(f"{axis}/*", step_metric=axis)
        self.run.log({**values, axis: step})

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        self.run.summary.update(headline)

    def close(self, ok: bool) -> None:
        sync_dir = Path(self.run.settings.sync_dir)
        self.run.finish(exit_code=0 if ok else 1)
        for path in sync_dir.rglob("*"):  # wandb links logs/debug-core.log to its cache even with symlink=False
            if path.is_symlink():
                path.unlink()

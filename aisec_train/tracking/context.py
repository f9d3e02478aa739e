"""The run's identity for trackers: its name, and whether it is one job of a Hydra multirun (then its sweep
directory groups the jobs: one MLflow experiment, one wandb group)."""

from __future__ import annotations

import os
from pathlib import Path

from aisec_train.tracking.base import RunInfo


def run_info(run_dir: Path, experiment: str) -> RunInfo:
    sweep_dir, name = None, run_dir.name
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode is RunMode.MULTIRUN:
            hydra_cfg = HydraConfig.get()
            sweep_dir, name = Path(hydra_cfg.sweep.dir), f"job{hydra_cfg.job.num}"
    except (ImportError, ValueError):  # no Hydra job (the Python API): a single run
        pass
    tags = {"experiment": experiment}
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        tags["rendezvous_id"] = os.environ["TORCHELASTIC_RUN_ID"]
    return RunInfo(run_dir=run_dir, run_name=name, experiment=experiment, sweep_dir=sweep_dir, tags=tags)

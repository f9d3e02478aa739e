"""The ``aisec-train`` console script: Hydra composes and type-checks the config, the pipeline runs.

Every refusal (bad override, bad data, tampered checkpoint, spent privacy budget) ends with one line on
stderr and exit status 2, before any work is lost; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.resources import files
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from aisec_train.config import register_configs, to_config
from aisec_train.data.errors import DataError
from aisec_train.errors import ConfigError
from aisec_train.store.errors import StoreError

CONFIG_DIR = str(files("aisec_train.configs"))
log = logging.getLogger("aisec_train")


# Refusals raised by modules that import torch or Opacus: (module, class).
HEAVY_REFUSALS = (
    ("aisec_train.train.checkpoint", "CheckpointError"),
    ("aisec_train.train.ledger", "BudgetExhausted"),
    ("aisec_train.train.callbacks", "NonFiniteError"),
)


def refusals() -> tuple[type[BaseException], ...]:
    """The errors that mean "bad input", answered in one line with exit 2. A heavy module's error can only have
    been raised if that module was imported, so only those already loaded are matched: a bad override is refused
    in about a second, without importing torch and Opacus just to name their error classes."""
    light = (ConfigError, DataError, StoreError, HydraException, OmegaConfBaseException)
    heavy = tuple(getattr(sys.modules[m], name) for m, name in HEAVY_REFUSALS if m in sys.modules)
    return light + heavy


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _job(dict_cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    experiment = hydra_cfg.runtime.choices.get("experiment", "quickstart")
    try:
        cfg = to_config(dict_cfg)  # type and range checks first: no torch needed to refuse a bad value
        from aisec_train.pipeline import run_pipeline  # heavy imports only once the config is valid
        from aisec_train.train.privacy import quiet_known_warnings

        quiet_known_warnings()
        report = run_pipeline(cfg, run_dir, experiment=experiment)
    except refusals() as err:
        refuse(err)  # inside the job, so Hydra adds no banner of its own
    log.info("report: %s", run_dir / "report.json")
    print(
        f"clean accuracy {report.get('metrics.clean_accuracy'):.4f}  epsilon {report.get('privacy.epsilon')}  "
        f"report {run_dir / 'report.json'}"
    )
    return float(report.get("metrics.clean_accuracy"))


def one_line(err: BaseException) -> str:
    """Flatten an error and its cause into one readable line (Hydra's search-path dump dropped)."""
    parts = [" ".join(str(err).split()).split(" Config search path:")[0]]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        parts.append(" ".join(str(cause).split()).split(" full_key:")[0])
    return ": ".join(p for p in parts if p)


def refuse(err: BaseException) -> NoReturn:
    print(f"aisec-train: error: {one_line(err)}", file=sys.stderr)
    sys.exit(2)


HYDRA_FILES = (".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "cli.log", "__main__.log")


def refuse_planted_links(argv: list[str]) -> None:
    """Hydra writes .hydra/*.yaml and the log into the run directory before any of our code runs: refuse a
    symlink planted there (or a run directory that is one) before Hydra can write through it."""
    for arg in argv:
        if arg.lstrip("+").startswith("hydra.run.dir="):  # also the forced forms +hydra.run.dir, ++hydra.run.dir
            run_dir = Path(arg.split("=", 1)[1]).expanduser()
            for path in (run_dir, *(run_dir / name for name in HYDRA_FILES)):
                if path.is_symlink():
                    refuse(ValueError(f"{path} is a symlink: aisec-train never writes through one; remove it"))


def main() -> None:
    refuse_planted_links(sys.argv[1:])
    # Hydra prints its own multi-line report of errors unless asked to re-raise; we re-raise and print one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    register_configs()
    try:
        _job()
    except refusals() as err:
        refuse(err)


if __name__ == "__main__":
    main()

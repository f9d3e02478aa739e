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

from aisec_train import errors
from aisec_train.config import register_configs, to_config
from aisec_train.errors import ConfigError, Refusal

PROG = "aisec-train"
CONFIG_DIR = str(files("aisec_train.configs"))
log = logging.getLogger("aisec_train")


def refusals() -> tuple[type[BaseException], ...]:
    """The errors that mean "bad input", answered in one line with exit 2: every ``Refusal`` (each error class
    says it is one, aisec_train/errors.py), and Hydra's and OmegaConf's errors about the overrides. Matching the
    base class needs no heavy import: a bad override is refused in about a second, before torch and Opacus load."""
    return (Refusal, HydraException, OmegaConfBaseException)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _job(dict_cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    experiment = hydra_cfg.runtime.choices.get("experiment", "quickstart")
    try:
        cfg = to_config(dict_cfg)  # type and range checks first: no torch needed to refuse a bad value
        from aisec_train.pipeline import run_pipeline  # heavy imports only once the config is valid
        from aisec_train.privacy.engine import quiet_known_warnings
        from aisec_train.quiet import quiet_library_warnings

        quiet_known_warnings()
        quiet_library_warnings()  # numpy's divide-by-zero at sample rate 1: the summary says what it means
        report = run_pipeline(cfg, run_dir, experiment=experiment)
    except refusals() as err:
        refuse(err)  # inside the job, so Hydra adds no banner of its own
    except OSError as err:
        refuse_write(err)
    from aisec_train.train.launch import env_rank

    if env_rank() != 0:  # a torchrun rank other than 0 only trained: rank 0 writes and prints the report
        return 0.0
    from aisec_train.report.summary import end_of_run

    print(end_of_run(report, run_dir))  # epsilon at delta, accuracy, failing items with their fixes, the files
    return float(report.get("metrics.clean_accuracy"))


def message(err: BaseException) -> str:
    """An error and its cause as one readable line (Hydra's search-path dump and OmegaConf's key dump dropped)."""
    parts = [errors.one_line(err).split(" Config search path:")[0]]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        parts.append(errors.one_line(cause).split(" full_key:")[0])
    return ": ".join(p for p in parts if p)


def refuse(err: BaseException) -> NoReturn:
    errors.refuse(PROG, message(err))


def refuse_write(err: OSError) -> NoReturn:
    """A disk or permission error is the environment's, not a bug: one line; anything else stays a traceback."""
    from aisec_train.preflight import write_failure

    line = write_failure(err)
    if line is None:
        raise err
    refuse(OSError(line))


def main() -> None:
    from aisec_train.preflight import cli_preflight
    from aisec_train.train.launch import cli_overrides

    try:  # before Hydra writes .hydra/ into the run directory or instantiates a callback
        sys.argv += cli_overrides(sys.argv[1:])  # under torchrun: the shared run directory (train/launch.py)
        cli_preflight(sys.argv[1:])
    except ConfigError as err:
        refuse(err)
    # Hydra prints its own multi-line report of errors unless asked to re-raise; we re-raise and print one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    register_configs()
    try:
        _job()
    except refusals() as err:
        refuse(err)
    except OSError as err:  # a full disk or a folder made read-only mid-run (Hydra's own writes included)
        refuse_write(err)


if __name__ == "__main__":
    main()

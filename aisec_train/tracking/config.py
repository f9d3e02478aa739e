"""The schema of the ``logger`` group: which experiment trackers receive the run, each a key of its own.

As in lightning-hydra-template, every file of ``configs/logger/`` fills one key, so several compose:
``logger=tensorboard``, ``logger=[csv,tensorboard,mlflow]``, or ``logger=many`` (csv, tensorboard, mlflow).
``logger=none`` (the default) keeps only the files every run writes (metrics.csv, report.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aisec_train.errors import ConfigError, require


@dataclass
class CsvLoggerConfig:
    path: str = "tracking/metrics.csv"  # inside the run directory: one row per logged value, written as it goes


@dataclass
class TensorBoardLoggerConfig:
    log_dir: str = "tensorboard"  # inside the run directory; point `tensorboard --logdir` at a sweep dir to compare


@dataclass
class MlflowLoggerConfig:
    # null: sqlite:///<dir>/mlflow.db with <dir> the sweep directory of a multirun (its jobs share one store and one
    # experiment), else the run directory. Any MLflow URI works (http://host:5000 for a tracking server).
    tracking_uri: str | None = None
    experiment_name: str | None = None  # null: the sweep directory of a multirun, else the Hydra experiment name
    run_name: str | None = None  # null: the run directory's name (a multirun job's number)
    log_model: bool = True  # model.pt (tagged checkpoint) as an artifact, beside the report files


@dataclass
class WandbLoggerConfig:
    project: str = "aisec-train"
    mode: str = "offline"  # offline writes a local run under <run dir>/wandb (wandb sync uploads it later)
    group: str | None = None  # null: the sweep directory of a multirun
    entity: str | None = None

    def __post_init__(self) -> None:
        ok = self.mode in ("offline", "online", "disabled")
        require(ok, "logger.wandb.mode", self.mode, "must be offline, online or disabled")


@dataclass
class LoggerConfig:
    csv: CsvLoggerConfig | None = None
    tensorboard: TensorBoardLoggerConfig | None = None
    mlflow: MlflowLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None
    every_n_steps: int = 1  # per-step values (loss, clip fraction, lr) every n optimizer steps
    # Epsilon spent on the step axis: 0 logs it at each epoch's last step (the epoch row's figure, computed anyway:
    # free); n >= 1 every n steps. Each is the accountant's exact epsilon, which costs the PRV accountant 70-80 ms
    # of CPU a call: every step of the default job would add ~25% to its wall time (docs/cluster.md).
    epsilon_every_n_steps: int = 0

    def __post_init__(self) -> None:
        require(self.every_n_steps >= 1, "logger.every_n_steps", self.every_n_steps, "must be >= 1")
        require(
            self.epsilon_every_n_steps >= 0, "logger.epsilon_every_n_steps", self.epsilon_every_n_steps,
            "must be >= 0 (0: at each epoch's end)",
        )  # fmt: skip

    def enabled(self) -> list[str]:
        return [name for name in LOGGERS if getattr(self, name) is not None]


LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")
MANY = ("csv", "tensorboard", "mlflow")  # configs/logger/many.yaml's defaults


def logger_off(overrides: list[Any]) -> ConfigError | None:
    """The one-line refusal for a key set under a logger that is off (``logger.csv.path=x`` without ``logger=csv``):
    its node is null, and OmegaConf fails on it with a bare AssertionError. Called with Hydra's parsed overrides
    after composing failed so; None when no override sets a logger's key (the failure is another's)."""
    named: set[str] = set()
    for override in overrides:
        if override.key_or_group == "logger" and not override.is_delete():
            value = override.value()
            named = {str(v) for v in value} if isinstance(value, list) else {str(value)}
    if "many" in named:
        named.update(MANY)
    keys = []
    for override in overrides:
        parts = override.key_or_group.split(".")
        if len(parts) > 1 and parts[0] == "logger" and parts[1] in LOGGERS:  # logger.csv.path=x, logger.csv={...}
            keys.append((override, parts[1]))
    off = [(o, name) for o, name in keys if name not in named] or keys
    if not off:
        return None
    override, name = off[0]
    other = "tensorboard" if name == "csv" else "csv"
    return ConfigError(
        f"{override.input_line} is not allowed: logger {name} is not on in this run; turn it on in the same "
        f"command (logger={name}, or a list such as logger=[{other},{name}])"
    )

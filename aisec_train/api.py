"""The Python API: the same pipeline as the ``aisec-train`` command, for your own model and datasets.

    >>> import aisec_train
    >>> cfg = aisec_train.compose(["privacy.target_epsilon=3", "train.epochs=10"])
    >>> report = aisec_train.run(cfg, model=MyNet(), train_dataset=my_train, test_dataset=my_test, run_dir="runs/a")
    >>> report.get("metrics.clean_accuracy"), report.get("privacy.epsilon")

``run`` goes through every stage (DP training, robustness, backdoor scan, audits, report) exactly as the CLI does;
``train`` is the one training loop on a DataLoader, for when you only want a (private) model. Bad input raises
the same one-line errors the CLI prints (``ConfigError``, ``DataError``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from importlib.resources import files
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, Dataset

from aisec_train.config import Config, register_configs, to_config
from aisec_train.report.report import Report
from aisec_train.run_state import UserObjects
from aisec_train.train.loop import TrainResult, resolve_device
from aisec_train.train.objectives import objective_from_config
from aisec_train.train.privacy import quiet_known_warnings


def compose(overrides: Sequence[str] = ()) -> Config:
    """The typed config the CLI would run with these Hydra overrides (``["dataset=npz", "dataset.path=x.npz"]``)."""
    register_configs()
    with initialize_config_dir(config_dir=str(files("aisec_train.configs")), version_base="1.3", job_name="api"):
        return to_config(hydra_compose(config_name="config", overrides=list(overrides)))


def run(
    config: Config | Sequence[str] | None = None,
    *,
    model: nn.Module | None = None,
    train_dataset: Dataset | None = None,
    test_dataset: Dataset | None = None,
    run_dir: str | Path | None = None,
    experiment: str = "api",
) -> Report:
    """Run the whole pipeline; ``model`` and the datasets replace ``model`` / ``dataset`` of the config.

    ``train_dataset`` items are ``(float image tensor (C, H, W) in [0, 1], int label)``; without ``test_dataset`` a
    stratified ``dataset.test_fraction`` is held out. Everything is written under ``run_dir`` (default
    ``outputs/api/<time>``); re-running with the same ``run_dir`` resumes.
    """
    from aisec_train.pipeline import run_pipeline

    quiet_known_warnings()
    cfg = config if isinstance(config, Config) else compose(config or ())
    if test_dataset is not None and train_dataset is None:
        raise ValueError("test_dataset needs train_dataset as well")
    path = Path(run_dir) if run_dir is not None else Path("outputs/api") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return run_pipeline(cfg, path, experiment=experiment, user=UserObjects(model, train_dataset, test_dataset))


def train(
    model: nn.Module,
    loader: DataLoader,
    config: Config | Sequence[str] | None = None,
    *,
    eval_dataset: Dataset | None = None,
) -> TrainResult:
    """The one training loop on ``loader``'s dataset, batch size and workers, with the config's privacy,
    adversarial-training and optimizer settings. Returns the trained (plain) model and its privacy ledger.

    Under ``privacy=dpsgd`` a model Opacus cannot train (BatchNorm, ...) is trained as a fixed copy
    (``ModuleValidator.fix``): use ``result.model``, not the object passed in."""
    from aisec_train.models.factory import fix_for_dp
    from aisec_train.train.config import PrivacyMode
    from aisec_train.train.loop import train as train_loop

    quiet_known_warnings()
    cfg = config if isinstance(config, Config) else compose(config or ())
    cfg.train.batch_size = loader.batch_size or cfg.train.batch_size
    if cfg.privacy.mode is PrivacyMode.dpsgd:  # as the pipeline's model factory does: BatchNorm -> GroupNorm, ...
        model = fix_for_dp(model, type(model).__qualname__)
    return train_loop(
        model,
        loader.dataset,
        train_cfg=cfg.train,
        privacy_cfg=cfg.privacy,
        device=resolve_device(cfg.train.device),
        objective=objective_from_config(cfg.robustness),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        eval_dataset=eval_dataset,
        workers=loader.num_workers,
    )

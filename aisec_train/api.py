"""The Python API: the same pipeline as the ``aisec-train`` command, for your own model and datasets.

    >>> import aisec_train
    >>> cfg = aisec_train.compose(["privacy.target_epsilon=3", "train.epochs=10"])
    >>> report = aisec_train.run(cfg, model=MyNet(), train_dataset=my_train, test_dataset=my_test, run_dir="runs/a")
    >>> report.get("metrics.clean_accuracy"), report.get("privacy.epsilon")

``run`` goes through every stage (DP training, robustness, backdoor scan, audits, report) exactly as the CLI does;
``fit`` is the one training loop on a DataLoader, for when you only want a (private) model. Both charge the
same dataset-level privacy ledger as the CLI (the data's records, in the store of ``privacy.ledger_store`` /
``$AISEC_TRAIN_LEDGER_STORE`` / the user's data folder): a call on spent data is refused. Bad input raises the same
one-line errors the CLI prints (``ConfigError``, ``DataError``, ``BudgetError``, ...).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from importlib.resources import files
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from aisec_train.config import Config, register_configs, to_config
from aisec_train.errors import ConfigError
from aisec_train.privacy.engine import quiet_known_warnings
from aisec_train.quiet import quiet_library_warnings
from aisec_train.report.report import Report
from aisec_train.run_state import Run, UserObjects
from aisec_train.tracking.config import logger_off
from aisec_train.train.loop import TrainResult, resolve_device
from aisec_train.train.objectives import objective_from_config


def compose(overrides: Sequence[str] = ()) -> Config:
    """The typed config the CLI would run with these Hydra overrides (``["dataset=npz", "dataset.path=x.npz"]``).

    A bad override raises the one-line ``ConfigError`` the CLI prints (Hydra's and OmegaConf's own errors, a
    config group given a non-name, a bool key given a number other than 0/1, a string instead of a list of
    overrides). Hydra's own settings (``hydra.*``, ``hydra/launcher=...``) are refused: the API runs no launcher,
    sweep, callback or log of Hydra's, so it would ignore them; ``hydra.searchpath`` (config groups of your own) is
    the one that composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from aisec_train.cli import check_bool_values, check_group_values, check_known_keys, check_override_syntax, message

    overrides = _overrides(overrides, "overrides")
    register_configs()
    try:
        check_override_syntax(overrides)  # the line names the override Hydra's grammar refuses
        parsed = OverridesParser.create().parse_overrides(overrides)
        _refuse_hydra_settings(parsed)
        searchpath = any(o.key_or_group.startswith("hydra.searchpath") for o in parsed)
        # train=null (Hydra's ValueError); model=nosuch named against the packaged options
        check_group_values(parsed, known_options=not searchpath)
        check_known_keys(parsed)  # privacy.targt_epsilon=3: the keys allowed, not Hydra's advice to add it with +
        with initialize_config_dir(config_dir=str(files("aisec_train.configs")), version_base="1.3", job_name="api"):
            try:
                composed = hydra_compose(config_name="config", overrides=overrides)
            except (AssertionError, AttributeError) as err:  # a key set under a logger that is off (cli.check_job)
                raise logger_off(parsed) or err from None
        check_bool_values(parsed, composed)  # dataset.channels_last=2, which OmegaConf reads as true (cli.py)
        return to_config(composed)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(message(err)) from None


def _refuse_hydra_settings(parsed: list) -> None:
    """Refuse an override of Hydra's own config: ``compose`` returns the job's config only, and ``run`` and ``fit``
    start no Hydra launcher, sweeper, callback or logging, so ``hydra.run.dir`` or ``hydra/launcher=slurm`` would
    be silently ignored (the run written elsewhere, the sweep never launched). ``hydra.searchpath`` composes."""
    for override in parsed:
        key = override.key_or_group
        if not (key == "hydra" or key.startswith(("hydra.", "hydra/"))) or key.startswith("hydra.searchpath"):
            continue
        if key.startswith("hydra.run"):
            instead = "give the run's folder as aisec_train.run(..., run_dir=DIR)"
        elif key.startswith(("hydra.sweep", "hydra.mode", "hydra/launcher", "hydra/sweeper", "hydra.launcher",
                             "hydra.sweeper")):  # fmt: skip
            instead = "a sweep is the command line's -m/--multirun; from Python, call run once per config"
        else:
            instead = "Hydra's own settings apply to the aisec-train command only"
        raise ConfigError(
            f"{override.input_line} is not allowed with the Python API: {instead} (only hydra.searchpath composes here)"
        )


def _overrides(given: object, name: str) -> list[str]:
    """``given`` as a list of override strings; a lone string (iterated, it would be one override per character),
    or anything else that is not a sequence of strings, is refused in one line."""
    ok = isinstance(given, Sequence) and not isinstance(given, (str, bytes))
    if not ok or not all(isinstance(item, str) for item in given):  # type: ignore[union-attr]
        raise ConfigError(
            f"{name}={given!r} is not allowed: a list of Hydra overrides such as ['train.epochs=10'] "
            "(or, for run and fit, a Config from aisec_train.compose)"
        )
    return list(given)  # type: ignore[arg-type]


def _config(config: Config | Sequence[str] | None) -> Config:
    """``run``'s and ``fit``'s ``config``: a Config checked again, else the overrides composed (None: the defaults).

    A Config is a plain dataclass the caller may have edited since ``compose`` (``cfg.train.epochs = 0``): its values
    are checked again, on a copy, as composing checks them, rather than reaching training unchecked (a batch size of
    -5 ended in torch's traceback after the run had started; epochs 0 was blamed on the target epsilon)."""
    if isinstance(config, Config):
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        from aisec_train.cli import message

        try:
            return to_config(OmegaConf.structured(config))
        except OmegaConfBaseException as err:  # a value of the wrong type ('x' for an int)
            raise ConfigError(message(err)) from None
    return compose(_overrides(config if config is not None else (), "config"))


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
    from aisec_train.preflight import check_data_paths

    quiet_known_warnings()
    quiet_library_warnings()  # numpy's divide-by-zero at sample rate 1, as the CLI (aisec_train/quiet.py)
    cfg = _config(config)
    if test_dataset is not None and train_dataset is None:
        raise ConfigError("test_dataset is not allowed without train_dataset: give both, or train_dataset alone")
    path = _run_dir(run_dir)
    if train_dataset is None:  # the data files exist, as the CLI checks before Hydra makes the run folder
        check_data_paths(cfg.dataset)
    # run_pipeline's preflight refuses a bad target or dataset item before its output check creates the folder: a
    # refused run leaves no folder or lock file behind (it used to be made here first)
    return run_pipeline(cfg, path, experiment=experiment, user=UserObjects(model, train_dataset, test_dataset))


def _run_dir(run_dir: object) -> Path:
    """``run``'s folder, checked as the CLI checks ``hydra.run.dir`` before anything is written: a path (str or
    PathLike), not empty (that would be the working directory itself), no symlink, not a file, creatable."""
    import os

    from aisec_train.preflight import check_run_dir

    if run_dir is None:
        return Path("outputs/api") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    if not isinstance(run_dir, (str, os.PathLike)) or not isinstance(os.fspath(run_dir), str):
        raise ConfigError(f"run_dir={run_dir!r} is not allowed: a folder path (str or Path) the run writes into")
    if not os.fspath(run_dir).strip():
        raise ConfigError(
            f"run_dir={run_dir!r} is not allowed: an empty folder name would be the working directory itself; give the "
            "folder the run writes into"
        )
    path = Path(run_dir).expanduser()
    check_run_dir("run_dir", path)
    return path


def fit(
    model: nn.Module,
    loader: DataLoader,
    config: Config | Sequence[str] | None = None,
    *,
    eval_dataset: Dataset | None = None,
) -> TrainResult:
    """The one training loop on ``loader``'s dataset, batch size and workers, with the config's privacy,
    adversarial-training and optimizer settings. Returns the trained (plain) model and its privacy ledger.

    Under ``privacy=dpsgd`` the spend is charged, before each epoch's end and at any stop (Ctrl-C's
    KeyboardInterrupt, an error: every step taken), to the dataset-level ledger of
    ``loader.dataset``'s records, under the same rules as a CLI run (``result.budget``: that account, every run
    on the data composed; a call whose planned spend does not fit is refused, ``BudgetError``, before any step).
    A model Opacus cannot train (BatchNorm, ...) is trained as a fixed copy (``ModuleValidator.fix``): use
    ``result.model``, not the object passed in."""
    from aisec_train.data.items import check_items
    from aisec_train.models.factory import fix_for_dp
    from aisec_train.preflight import check_limits
    from aisec_train.robust.config import check_backend
    from aisec_train.train.config import PrivacyMode
    from aisec_train.train.loop import train as train_loop

    quiet_known_warnings()
    quiet_library_warnings()  # numpy's divide-by-zero at sample rate 1, as the CLI (aisec_train/quiet.py)
    cfg = _config(config)
    _check_fit(cfg)  # what only the pipeline does is refused, never silently skipped
    if not isinstance(loader, DataLoader):
        raise ConfigError(
            f"loader={type(loader).__name__} is not allowed: a torch.utils.data.DataLoader over (image, label) items "
            "(its dataset, batch size and workers are used)"
        )
    shape, top = check_items(loader.dataset, "loader.dataset", min_items=1)  # every item before a step (data/items.py)
    check_limits(cfg)  # float32 range, accountant and resource limits (preflight.py)
    check_backend(cfg.robustness.backend, resolve_device(cfg.train.device))  # robust/config.py, as run's preflight
    if eval_dataset is not None:
        top = max(top, check_items(eval_dataset, "eval_dataset")[1])
    cfg.train.batch_size = loader.batch_size or cfg.train.batch_size
    if cfg.privacy.mode is PrivacyMode.dpsgd:  # as the pipeline's model factory does: BatchNorm -> GroupNorm, ...
        model = fix_for_dp(model, type(model).__qualname__)
    _check_outputs(model, shape, top)
    account = _Account(cfg, loader.dataset, eval_dataset)
    with account.run.resources:  # the dataset ledger's lock, for the whole call
        result = train_loop(
            model,
            loader.dataset,
            train_cfg=cfg.train,
            privacy_cfg=cfg.privacy,
            device=resolve_device(cfg.train.device),
            objective=objective_from_config(cfg.robustness),
            optimizer=cfg.optimizer,
            scheduler=cfg.scheduler,
            eval_dataset=eval_dataset,
            spend=account.open(),
            workers=loader.num_workers,
        )
        result.budget = account.summary()  # type: ignore[attr-defined]
    return result


def _check_outputs(model: nn.Module, shape: tuple[int, ...], top: int) -> None:
    """One forward of two blank images, in eval mode and without gradients (no weights or statistics change): the
    model must give one logit per class for every label the data holds. A label past them was cross-entropy's
    ``IndexError: Target 7 is out of bounds`` part-way through the first epoch."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape, device=device))
    except Exception as err:  # noqa: BLE001 - the user's forward failed: one line naming it
        raise ConfigError(
            f"model: a forward of 2 images of shape {shape} failed ({type(err).__name__}: {err})"
        ) from None
    finally:
        model.train(was_training)
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 2):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model returns {got} for 2 images of shape {shape}; expected (2, classes) logits")
    if out.shape[1] <= top:
        raise ConfigError(
            f"the data holds label {top}, but the model returns {out.shape[1]} logits per image: labels must be 0 to "
            f"{out.shape[1] - 1} (give the model {top + 1} outputs, or relabel the data)"
        )


def _check_fit(cfg: Config) -> None:
    """``fit`` is the one training loop in this process on a given model object: a setting only ``run`` (the
    pipeline) carries out is refused in one line before any work, rather than trained without and never said."""
    from aisec_train.backdoor.config import BackdoorAttack
    from aisec_train.federated.config import FederatedMode
    from aisec_train.models.finetune import split

    use_run = "; aisec_train.run (or the CLI) does it"
    if cfg.train.distributed.nproc > 1:
        raise ConfigError(
            f"train.distributed.nproc={cfg.train.distributed.nproc} is not allowed with fit: fit trains in this "
            f"one process{use_run}"
        )
    from aisec_train.train.launch import env_world
    from aisec_train.train.loop import rank_and_world

    world = max(env_world(), rank_and_world()[1])
    if world > 1:  # every rank opened the dataset ledger as its own run: a LockError on one, a gloo error on the rest
        raise ConfigError(
            f"WORLD_SIZE={world} is not allowed with fit: fit trains in this one process and charges its own run; "
            f"data-parallel training under torchrun is aisec_train.run or the CLI (one ledger for the job)"
        )
    if cfg.federated.mode is not FederatedMode.none:
        mode = cfg.federated.mode.value
        raise ConfigError(f"federated={mode!r} is not allowed with fit: fit trains centrally{use_run}")
    if cfg.backdoor.attack is not BackdoorAttack.none:
        raise ConfigError(
            f"backdoor.attack={cfg.backdoor.attack.value!r} is not allowed with fit: fit neither poisons nor "
            f"repairs{use_run}"
        )
    _, tune = split(cfg.model)
    given = {"model.trainable": (tune.trainable, "all"), "model.checkpoint_path": (tune.checkpoint_path, None),
             "model.batchnorm": (tune.batchnorm, "auto"), "model.pretrained": (tune.pretrained, False)}  # fmt: skip
    for key, (value, default) in given.items():
        if value != default:
            raise ConfigError(
                f"{key}={value!r} is not allowed with fit: fit trains the model object as given (freeze what "
                f"should not train with requires_grad_(False)); aisec_train.run(model=...) applies {key}"
            )


class _Account:
    """``fit``'s account in the dataset ledger, opened by the pipeline's own data and spend code (the data stage's
    dataset identity, the store's rules), so the API is charged exactly as a CLI run on the same records."""

    def __init__(self, cfg: Config, dataset: Dataset, eval_dataset: Dataset | None):
        self.run = Run(cfg=cfg, run_dir=Path.cwd(), experiment="api.fit")
        self.dataset, self.eval_dataset, self.spend = dataset, eval_dataset, None

    def open(self):
        from aisec_train.data.dataset import load_dataset
        from aisec_train.privacy.admission import open_spend
        from aisec_train.privacy.ledger_store import who
        from aisec_train.train.config import PrivacyMode

        cfg = self.run.cfg
        if cfg.privacy.mode is not PrivacyMode.dpsgd:
            return None
        # every record of the loader is trained on: a held-out split would hide records from the ledger, so the
        # test side is the caller's eval set (or one training item, only to satisfy the loader's shape check)
        test = self.eval_dataset if self.eval_dataset is not None else Subset(self.dataset, [0])
        self.run.data = load_dataset(cfg.dataset, cfg.train.seed, train=self.dataset, test=test)
        if self.run.data.duplicates_removed:  # the loader trains on its dataset as given: refuse, never drop rows
            from aisec_train.data.errors import DataError

            raise DataError(
                f"the loader's dataset holds {self.run.data.duplicates_removed} exact duplicate record(s); under DP "
                "each record must appear once (a copy is the same person counted twice): deduplicate it first"
            )
        user, host = who()
        run_id = f"api.fit {user}@{host} {datetime.now().isoformat(timespec='seconds')} {uuid.uuid4().hex[:8]}"
        self.spend = open_spend(self.run, run_id=run_id)
        return self.spend

    def summary(self) -> dict | None:
        if self.spend is None:
            return None
        return {**self.run.report.sections.get("privacy", {}), **self.spend.summary()}

"""The membership audit's design and its reference models.

Targets are balanced: ``m`` members from the training split and ``m`` non-members from the held-out split,
chosen by indices. The attacker's pool is every other sample (a view, nothing copied). Offline LiRA's OUT
reference models are fresh models from the run's :class:`~aisec_train.models.ModelFactory`, each trained by the
one :func:`~aisec_train.train.loop.train` on a random half of the pool with the audited run's recipe: the same
objective (``objective_from_config(cfg.robustness)``), optimizer and scheduler configs, augmentation, epochs,
sample rate and, under DP, the audited run's measured noise multiplier. No target is in any reference model.

>>> targets = design(data, m=360, seed=0)  # doctest: +SKIP
>>> refs, population_in, steps = train_reference_models(cfg, data, run.factory, targets, device)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from aisec_train.data.views import subset
from aisec_train.train.callbacks import BudgetStop
from aisec_train.train.config import Accountant, PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.train.loop import train
from aisec_train.train.objectives import objective_from_config

if TYPE_CHECKING:
    from aisec_train.config import Config
    from aisec_train.data.dataset import DataBundle
    from aisec_train.models.factory import ModelFactory

POPULATION_SAMPLES = 1000  # pool samples every model is also scored on (RMIA's z); bounded, seeded


@dataclass
class Targets:
    """The audit's design, by indices: targets, the attacker's pool and its population sample."""

    members: np.ndarray  # indices into the training split
    nonmembers: np.ndarray  # indices into the held-out split
    pool: Dataset  # the remaining training samples, then the remaining held-out samples (a view)
    pool_members: int  # the first ``pool_members`` pool samples are in the audited model's training split
    population: np.ndarray  # pool indices: held-out ones first (not in the audited model's training), then the rest

    @property
    def m(self) -> int:
        return len(self.members)


def choose_targets(n_train: int, n_test: int, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``m`` members (training split) and ``m`` non-members (held-out split)."""
    return rng.permutation(n_train)[:m], rng.permutation(n_test)[:m]


def design(data: DataBundle, m: int, seed: int) -> Targets:
    """Balanced targets, the attacker's pool (every other sample) and a population sample of the pool."""
    rng = np.random.default_rng(seed + 104729)
    members, nonmembers = choose_targets(len(data.train), len(data.test), m, rng)  # type: ignore[arg-type]
    rest_train = np.setdiff1d(np.arange(len(data.train)), members)  # type: ignore[arg-type]
    rest_test = np.setdiff1d(np.arange(len(data.test)), nonmembers)  # type: ignore[arg-type]
    parts = [subset(data.train, rest_train)] + ([subset(data.test, rest_test)] if len(rest_test) else [])
    pool = ConcatDataset(parts)
    # RMIA wants z the audited model did not train on: the unused held-out samples first, topped up from training.
    order = np.random.default_rng(seed + 15485863)
    heldout_z = len(rest_train) + order.permutation(len(rest_test))
    population = np.r_[heldout_z, order.permutation(len(rest_train))][:POPULATION_SAMPLES].astype(np.int64)
    return Targets(members, nonmembers, pool, len(rest_train), population)


def reference_configs(
    cfg: Config, n_target: int, n_reference: int, noise_multiplier: float | None
) -> tuple[TrainConfig, PrivacyConfig]:
    """Training settings for an OUT model that mimic the audited model's training on a smaller set.

    LiRA's reference models must be trained like the target. On a pool half the size, the same batch size
    would halve the steps per epoch (a less fitted model) and, under DP, double the sample rate. Scaling the
    batch keeps the sample rate and step count; under DP the audited run's measured noise multiplier is
    reused instead of calibrating again, so no accountant work decides the noise (GDP only keeps the books).
    """
    audit = cfg.audit.membership
    epochs = min(audit.reference_epochs or cfg.train.epochs, cfg.train.epochs)
    batch = max(1, round(cfg.train.batch_size * n_reference / n_target))
    train_cfg = dataclasses.replace(
        cfg.train,
        epochs=epochs,
        batch_size=batch,
        max_physical_batch_size=min(batch, cfg.train.max_physical_batch_size),
    )
    privacy = cfg.privacy
    if privacy.mode is PrivacyMode.dpsgd and noise_multiplier is not None:
        privacy = dataclasses.replace(
            privacy, target_epsilon=None, noise_multiplier=noise_multiplier, accountant=Accountant.gdp
        )
    return train_cfg, privacy


def reference_recipe(cfg: Config) -> dict[str, Any]:
    """The audited run's objective, optimizer and scheduler: what :func:`train` needs besides the two configs."""
    return {
        "objective": objective_from_config(cfg.robustness),
        "optimizer": cfg.optimizer,
        "scheduler": cfg.scheduler,
        "workers": cfg.dataset.workers,
    }


def train_reference_models(
    cfg: Config,
    data: DataBundle,
    factory: ModelFactory,
    targets: Targets,
    device: torch.device,
    noise_multiplier: float | None = None,
    *,
    max_steps: int | None = None,
) -> tuple[list[nn.Module], np.ndarray, list[int | None]]:
    """OUT models for offline LiRA, each on a random half of the pool; returns them, the (R, Z) bool mask of
    which population samples each trained on and the steps each took (None without DP). ``max_steps`` (under DP:
    the audited run's steps) ends each one's training where the audited run's ended, as the privacy budget's stop
    did (a faithful mimic)."""
    rng = np.random.default_rng(cfg.train.seed + 7919)
    pool, recipe = targets.pool, reference_recipe(cfg)
    models, population_in, steps = [], [], []
    for i in range(cfg.audit.membership.reference_models):
        half = np.sort(rng.permutation(len(pool))[: len(pool) // 2])
        train_cfg, privacy_cfg = reference_configs(cfg, len(data.train), len(half), noise_multiplier)  # type: ignore[arg-type]
        train_cfg = dataclasses.replace(train_cfg, seed=cfg.train.seed + 1 + i)
        with warnings.catch_warnings():
            # GDP only keeps the books here (the noise is the audited run's), so its accuracy caveat does not apply.
            warnings.filterwarnings("ignore", message="GDP accounting is experimental")
            result = train(
                factory(seed=train_cfg.seed),
                data.training_view(subset(pool, half)),  # augmented exactly as the audited run's training split
                train_cfg=train_cfg,
                privacy_cfg=privacy_cfg,
                device=device,
                progress=False,
                callbacks=[BudgetStop(max_steps)] if max_steps is not None else (),
                **recipe,
            )
        models.append(result.model.eval())
        population_in.append(np.isin(targets.population, half))
        steps.append(result.ledger.steps if result.ledger is not None else None)
    return models, np.asarray(population_in, dtype=bool).reshape(len(models), len(targets.population)), steps

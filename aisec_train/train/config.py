"""The schema of the ``train`` and ``privacy`` groups: the one training loop's settings and DP-SGD's.

OmegaConf checks types (an ``int`` field refuses ``abc``, an ``Enum`` field lists its allowed values);
``__post_init__`` checks ranges. Every error is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from aisec_train.errors import require


def finite_positive(value: float, key: str) -> None:
    require(math.isfinite(value) and value > 0, key, value, "must be a finite number > 0")


MIN_NOISE_MULTIPLIER = 1e-3


class PrivacyMode(Enum):
    dpsgd = "dpsgd"
    none = "none"


class Accountant(Enum):
    prv = "prv"
    rdp = "rdp"
    gdp = "gdp"


class GradSampleMode(Enum):
    bk = "bk"  # book-keeping: one backward pass, per-layer ghost norm or instantiation (train/bk)
    ghost = "ghost"  # Opacus fast gradient clipping (two backward passes)
    hooks = "hooks"  # Opacus per-sample gradients (instantiated for every layer)


class BudgetScope(Enum):
    dataset = "dataset"  # the spend is charged to the data (its manifest hash) across every run on it
    run = "run"  # the spend is charged to this run directory only (the report and model card say so)


@dataclass
class PrivacyConfig:
    mode: PrivacyMode = PrivacyMode.dpsgd
    target_epsilon: float | None = 3.0  # calibrates the noise, and is the budget enforced
    delta: float = 1e-5  # must be below 1 / n_train unless delta_reason records why not
    delta_reason: str | None = None  # the recorded reason for a delta >= 1 / n_train
    noise_multiplier: float | None = None  # explicit noise instead of calibration from target_epsilon
    max_grad_norm: float = 0.5
    accountant: Accountant = Accountant.prv
    grad_sample_mode: GradSampleMode = GradSampleMode.bk  # falls back per layer / per model, as reported
    poisson_sampling: bool = True
    budget_scope: BudgetScope = BudgetScope.dataset
    # The project's privacy ledger store; null: $AISEC_TRAIN_LEDGER_STORE, else privacy_ledgers/ beside the registry.
    ledger_store: str | None = None

    def __post_init__(self) -> None:
        if self.mode is PrivacyMode.none:
            return
        if self.target_epsilon is not None:
            finite_positive(self.target_epsilon, "privacy.target_epsilon")
        require(0 < self.delta < 1, "privacy.delta", self.delta, "must be in (0, 1)")
        if self.noise_multiplier is not None:
            finite_positive(self.noise_multiplier, "privacy.noise_multiplier")
            # Below this the accountants overflow (they divide by sigma**2) and no guarantee is left to report.
            ok, allowed = self.noise_multiplier >= MIN_NOISE_MULTIPLIER, f"must be >= {MIN_NOISE_MULTIPLIER}"
            require(ok, "privacy.noise_multiplier", self.noise_multiplier, allowed + " (privacy=none: no DP)")
        require(
            self.target_epsilon is not None or self.noise_multiplier is not None,
            "privacy.target_epsilon",
            self.target_epsilon,
            "set privacy.target_epsilon or privacy.noise_multiplier",
        )
        finite_positive(self.max_grad_norm, "privacy.max_grad_norm")


@dataclass
class DistributedConfig:
    """Data-parallel training on one node: ``nproc`` processes (one per GPU on CUDA, gloo on the CPU)."""

    nproc: int = 1
    backend: str = "auto"  # auto: nccl on CUDA, gloo on the CPU
    port: int = 0  # rendezvous port on 127.0.0.1; 0 = a free one

    def __post_init__(self) -> None:
        require(self.nproc >= 1, "train.distributed.nproc", self.nproc, "must be >= 1")
        ok = self.backend in ("auto", "gloo", "nccl")
        require(ok, "train.distributed.backend", self.backend, "must be auto, gloo or nccl")
        require(0 <= self.port < 65536, "train.distributed.port", self.port, "must be in [0, 65535]")


@dataclass
class TrainConfig:
    """The loop's settings. The optimizer and LR scheduler are ``_target_`` groups of their own
    (``optimizer=sgd|adam|adamw``, ``scheduler=none|cosine``) that read ``lr``, ``momentum`` and ``weight_decay``
    from here, so ``train.lr=0.1`` keeps working whichever optimizer is chosen."""

    epochs: int = 40
    batch_size: int = 512  # the logical (expected, under Poisson sampling) batch size
    max_physical_batch_size: int = 512  # memory cap; larger logical batches are split
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    ema_decay: float = 0.97  # weight averaging (free post-processing of DP iterates); 0 turns it off
    lock_wait_s: float = 0.0  # a second job on the same run directory or dataset ledger waits this long, then refuses
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        require(0 <= self.seed < 2**32, "train.seed", self.seed, "must be in [0, 2**32)")  # numpy's seed range
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        require(
            self.max_physical_batch_size >= 1,
            "train.max_physical_batch_size",
            self.max_physical_batch_size,
            "must be >= 1",
        )
        finite_positive(self.lr, "train.lr")
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1)")
        ok = math.isfinite(self.weight_decay) and self.weight_decay >= 0
        require(ok, "train.weight_decay", self.weight_decay, "must be a finite number >= 0")
        require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "must be in [0, 1)")
        ok = math.isfinite(self.lock_wait_s) and self.lock_wait_s >= 0
        require(ok, "train.lock_wait_s", self.lock_wait_s, "must be a finite number >= 0")
        ok = self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        require(ok, "train.device", self.device, "must be auto, cpu, cuda or cuda:N")

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


# fp16's loss scaler multiplies each per-sample gradient before clipping, and skips a step when the batch's own
# gradients overflow: refused under DP with the config (aisec_train/config.py), on the device (train/precision.py)
# and in the loop, whatever path reached it.
FP16_UNDER_DP = (
    "train.precision='fp16' is not allowed with privacy=dpsgd: its loss scaler multiplies each per-sample "
    "gradient before clipping; allowed: bf16 (no scaler needed) or 32"
)


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
    poisson_sampling: bool = True  # must stay true under DP: the accountants' epsilon assumes it
    # Debug only: noise and Poisson draws follow train.seed (replayable), and the run claims NO DP guarantee.
    reproducible_noise: bool = False
    budget_scope: BudgetScope = BudgetScope.dataset
    # budget_scope=run: the reason, recorded in the dataset's ledger, for taking the data past its target
    budget_reason: str | None = None
    # when the planned spend does not fit the dataset's remainder: calibrate the noise to it (false: refuse)
    fit_to_budget: bool = False
    # The privacy ledger store; null: $AISEC_TRAIN_LEDGER_STORE, else the user's data folder (never the working
    # directory); "scratch": a throwaway store of the run's own for experiments (not the team's ledger).
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
        if self.budget_reason is not None:  # recorded in the ledger: one printable line (privacy/ledger_rules.py)
            ok = str(self.budget_reason).strip() != "" and str(self.budget_reason).isprintable()
            why = "must be one line of printable text, at most 200 characters"
            require(ok and len(str(self.budget_reason)) <= 200, "privacy.budget_reason", self.budget_reason, why)
        # Shuffled fixed-size batches have no amplification by subsampling to claim, and accounting them honestly
        # is not what Opacus' accountants do: refused rather than over-claimed (docs/privacy.md).
        allowed = "must be true under DP (the accountants assume Poisson sampling); privacy=none trains without DP"
        require(self.poisson_sampling, "privacy.poisson_sampling", self.poisson_sampling, allowed)


# train.distributed.timeout's range: ranks started a moment apart must still meet; past a day a missing rank is not
# late but gone (and inf or nan would reach datetime.timedelta as a traceback).
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 86400.0


@dataclass
class DistributedConfig:
    """Data-parallel training on one node: ``nproc`` processes (one per GPU on CUDA, gloo on the CPU)."""

    nproc: int = 1
    backend: str = "auto"  # auto: nccl on CUDA, gloo on the CPU
    port: int = 0  # rendezvous port on 127.0.0.1; 0 = a free one
    max_restarts: int = 0  # elastic restarts of the local ranks after one dies (resumed from the last checkpoint)
    strategy: str = "ddp"  # ddp (Opacus DPDDP / torch DDP); fsdp: FSDP2 shards, ghost_fsdp (train/sharding.py)
    # Seconds a rank waits at the rendezvous and in each collective before it gives up (torch's default: 30 min on
    # gloo, 10 on NCCL; 600 s is also torchrun's rendezvous join timeout: docs/cluster.md).
    timeout: float = 600.0

    def __post_init__(self) -> None:
        require(self.nproc >= 1, "train.distributed.nproc", self.nproc, "must be >= 1")
        ok = self.backend in ("auto", "gloo", "nccl")
        require(ok, "train.distributed.backend", self.backend, "must be auto, gloo or nccl")
        require(0 <= self.port < 65536, "train.distributed.port", self.port, "must be in [0, 65535]")
        require(self.max_restarts >= 0, "train.distributed.max_restarts", self.max_restarts, "must be >= 0")
        # fsdp: what Opacus' FSDP2 path cannot run is refused with the rest of the config (train/sharding.py).
        ok = self.strategy in ("ddp", "fsdp")
        require(ok, "train.distributed.strategy", self.strategy, "must be ddp or fsdp (docs/cluster.md)")
        ok = math.isfinite(self.timeout) and MIN_TIMEOUT_S <= self.timeout <= MAX_TIMEOUT_S
        allowed = f"must be a number of seconds from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g} (a day)"
        require(ok, "train.distributed.timeout", self.timeout, allowed)


@dataclass
class TrainConfig:
    """The loop's settings. The optimizer and LR scheduler are ``_target_`` groups of their own
    (``optimizer=sgd|adam|adamw``, ``scheduler=none|cosine``) that read ``lr``, ``momentum`` and ``weight_decay``
    from here, so ``train.lr=0.1`` keeps working whichever optimizer is chosen."""

    epochs: int = 40
    batch_size: int = 512  # the logical (expected, under Poisson sampling) batch size
    max_physical_batch_size: int = 512  # memory cap in records (augmult: K rows each); larger batches are split
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    ema_decay: float = 0.97  # weight averaging (free post-processing of DP iterates); 0 turns it off
    augmult: int = 1  # K augmented views per record, averaged into one clipped gradient (train/augmult.py)
    augmult_flip: bool = False  # augmult views are also mirrored at random (natural images; not digits)
    precision: str = "32"  # 32, bf16 or fp16: autocast of the forward pass (train/precision.py)
    keep_freed_memory: bool = True  # glibc keeps freed blocks mapped: no page faults each step (train/allocator.py)
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
        require(self.augmult >= 1, "train.augmult", self.augmult, "must be an integer >= 1 (1: no multiplicity)")
        ok = self.precision in ("32", "bf16", "fp16")
        require(ok, "train.precision", self.precision, "must be 32, bf16 or fp16")
        ok = math.isfinite(self.lock_wait_s) and self.lock_wait_s >= 0
        require(ok, "train.lock_wait_s", self.lock_wait_s, "must be a finite number >= 0")
        ok = self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        require(ok, "train.device", self.device, "must be auto, cpu, cuda or cuda:N")

"""Typed configuration: the schema every Hydra override is checked against.

OmegaConf checks types (an ``int`` field refuses ``abc``, an ``Enum`` field lists its allowed values);
``__post_init__`` checks ranges when :func:`to_config` turns the composed config into these dataclasses.
Each error is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value outside its allowed range."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


class DatasetName(Enum):
    digits = "digits"
    npz = "npz"
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"
    synthetic = "synthetic"


class ModelName(Enum):
    cnn = "cnn"
    mlp = "mlp"
    resnet18_gn = "resnet18_gn"


class PrivacyMode(Enum):
    dpsgd = "dpsgd"
    none = "none"


class Accountant(Enum):
    prv = "prv"
    rdp = "rdp"
    gdp = "gdp"


class GradSampleMode(Enum):
    ghost = "ghost"
    hooks = "hooks"


class OptimizerName(Enum):
    sgd = "sgd"
    adam = "adam"


class Norm(Enum):
    linf = "linf"
    l2 = "l2"


class RobustMode(Enum):
    none = "none"
    pgd_at = "pgd_at"
    fgsm_rs = "fgsm_rs"


@dataclass
class DatasetConfig:
    name: DatasetName = DatasetName.digits
    path: str | None = None  # npz: the training (or whole) file
    test_path: str | None = None  # npz: an optional separate test file
    root: str | None = None  # mnist / fashion_mnist / cifar10: an existing torchvision-style root
    test_fraction: float = 0.2  # stratified hold-out when no test split is given
    sha256: str | None = None  # pin of data.manifest_sha256: a mismatch refuses to train
    outlier_z: float = 6.0  # robust z-score above which a sample is reported as an outlier
    # synthetic: a seeded, learnable toy set for smoke tests and benchmarks
    n_samples: int = 1000
    image_size: int = 8
    channels: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        require(0.0 < self.test_fraction < 1.0, "dataset.test_fraction", self.test_fraction, "must be in (0, 1)")
        require(self.outlier_z > 0, "dataset.outlier_z", self.outlier_z, "must be > 0")
        if self.sha256 is not None:
            ok = len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256.lower())
            require(ok, "dataset.sha256", self.sha256, "must be 64 hexadecimal characters")
        if self.name is DatasetName.npz:
            require(bool(self.path), "dataset.path", self.path, "dataset=npz needs a .npz file path")
        if self.name is DatasetName.synthetic:
            require(self.n_samples >= 20, "dataset.n_samples", self.n_samples, "must be >= 20")
            require(self.num_classes >= 2, "dataset.num_classes", self.num_classes, "must be >= 2")
            require(self.image_size >= 4, "dataset.image_size", self.image_size, "must be >= 4")
            require(self.channels in (1, 3), "dataset.channels", self.channels, "must be 1 or 3")


@dataclass
class ModelConfig:
    name: ModelName = ModelName.cnn


@dataclass
class PrivacyConfig:
    mode: PrivacyMode = PrivacyMode.dpsgd
    target_epsilon: float | None = 3.0  # calibrates the noise, and is the budget enforced
    delta: float = 1e-5
    noise_multiplier: float | None = None  # explicit noise instead of calibration from target_epsilon
    max_grad_norm: float = 0.5
    accountant: Accountant = Accountant.prv
    grad_sample_mode: GradSampleMode = GradSampleMode.ghost
    poisson_sampling: bool = True

    def __post_init__(self) -> None:
        if self.mode is PrivacyMode.none:
            return
        if self.target_epsilon is not None:
            require(self.target_epsilon > 0, "privacy.target_epsilon", self.target_epsilon, "must be > 0")
        require(0 < self.delta < 1, "privacy.delta", self.delta, "must be in (0, 1)")
        if self.noise_multiplier is not None:
            require(self.noise_multiplier > 0, "privacy.noise_multiplier", self.noise_multiplier, "must be > 0")
        require(
            self.target_epsilon is not None or self.noise_multiplier is not None,
            "privacy.target_epsilon",
            self.target_epsilon,
            "set privacy.target_epsilon or privacy.noise_multiplier",
        )
        require(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "must be > 0")


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 512  # the logical (expected, under Poisson sampling) batch size
    max_physical_batch_size: int = 512  # memory cap; larger logical batches are split
    optimizer: OptimizerName = OptimizerName.sgd
    lr: float = 2.0
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda or cuda:N

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        require(
            self.max_physical_batch_size >= 1,
            "train.max_physical_batch_size",
            self.max_physical_batch_size,
            "must be >= 1",
        )
        require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1)")
        ok = self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        require(ok, "train.device", self.device, "must be auto, cpu, cuda or cuda:N")


@dataclass
class AttackConfig:
    name: str = "pgd"
    norm: Norm = Norm.linf
    eps: float = 0.1
    step_size: float = 0.02
    steps: int = 20
    restarts: int = 2

    def __post_init__(self) -> None:
        require(self.name in ("pgd", "fgsm"), "robustness.eval.name", self.name, "must be pgd or fgsm")
        require(self.eps > 0, "robustness.eval.eps", self.eps, "must be > 0")
        require(self.step_size > 0, "robustness.eval.step_size", self.step_size, "must be > 0")
        require(self.steps >= 1, "robustness.eval.steps", self.steps, "must be >= 1")
        require(self.restarts >= 1, "robustness.eval.restarts", self.restarts, "must be >= 1")


@dataclass
class RobustnessConfig:
    mode: RobustMode = RobustMode.none  # adversarial training: none, pgd_at (Madry) or fgsm_rs (Wong 2020)
    norm: Norm = Norm.linf
    eps: float = 0.1  # training attack radius (digits default, pixel scale [0, 1])
    step_size: float = 0.025
    steps: int = 7
    backend: str = "auto"  # kernel backend: auto, triton or torch
    evaluate: bool = True  # robust accuracy in every report
    eval_samples: int = 0  # 0 = the whole test split
    eval: AttackConfig = field(default_factory=AttackConfig)

    def __post_init__(self) -> None:
        require(self.eps > 0, "robustness.eps", self.eps, "must be > 0")
        require(self.step_size > 0, "robustness.step_size", self.step_size, "must be > 0")
        require(self.steps >= 1, "robustness.steps", self.steps, "must be >= 1")
        require(
            self.backend in ("auto", "triton", "torch"),
            "robustness.backend",
            self.backend,
            "auto|triton|torch",
        )
        require(self.eval_samples >= 0, "robustness.eval_samples", self.eval_samples, "must be >= 0")


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    experiment: str = "quickstart"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Turn the composed Hydra config into the typed dataclasses, running every range check."""
    cfg_obj = OmegaConf.to_object(cfg)
    assert isinstance(cfg_obj, Config)
    return cfg_obj

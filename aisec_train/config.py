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
    epochs: int = 40
    batch_size: int = 512  # the logical (expected, under Poisson sampling) batch size
    max_physical_batch_size: int = 512  # memory cap; larger logical batches are split
    optimizer: OptimizerName = OptimizerName.sgd
    lr: float = 0.5
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    ema_decay: float = 0.97  # weight averaging (free post-processing of DP iterates); 0 turns it off
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

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
        require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "must be in [0, 1)")
        ok = self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        require(ok, "train.device", self.device, "must be auto, cpu, cuda or cuda:N")


# Default L-inf radius per dataset on the [0, 1] pixel scale (docs/robustness.md): the values the literature
# evaluates at (MNIST 0.3, CIFAR-10 8/255); digits' 8x8, 17-level images get 0.1, as do unknown npz sets.
DEFAULT_EPS = {"digits": 0.1, "mnist": 0.3, "fashion_mnist": 0.1, "cifar10": 8 / 255, "synthetic": 0.1, "npz": 0.1}


def _pgd_step(eps: float, steps: int) -> float:
    return 2.5 * eps / steps  # Madry et al.: enough to cross the ball from any start within the steps


@dataclass
class AttackConfig:
    """The evaluation attack; stronger than the training one (more steps, restarts) by default."""

    name: str = "pgd"
    norm: Norm = Norm.linf
    eps: float | None = None  # None: the training radius (robustness.eps)
    step_size: float | None = None  # None: 2.5 * eps / steps
    steps: int = 20
    restarts: int = 2

    def __post_init__(self) -> None:
        require(self.name in ("pgd", "fgsm"), "robustness.eval.name", self.name, "must be pgd or fgsm")
        require(self.eps is None or self.eps > 0, "robustness.eval.eps", self.eps, "must be > 0 or null")
        ok = self.step_size is None or self.step_size > 0
        require(ok, "robustness.eval.step_size", self.step_size, "must be > 0 or null")
        require(self.steps >= 1, "robustness.eval.steps", self.steps, "must be >= 1")
        require(self.restarts >= 1, "robustness.eval.restarts", self.restarts, "must be >= 1")


@dataclass
class RobustnessConfig:
    mode: RobustMode = RobustMode.none  # adversarial training: none, pgd_at (Madry) or fgsm_rs (Wong 2020)
    norm: Norm = Norm.linf
    eps: float | None = None  # training attack radius; None: DEFAULT_EPS of the dataset
    step_size: float | None = None  # None: 2.5 * eps / steps (pgd_at), 1.25 * eps (fgsm_rs)
    steps: int = 7
    backend: str = "auto"  # kernel backend: auto, triton or torch
    evaluate: bool = True  # robust accuracy in every report
    eval_samples: int = 0  # 0 = the whole test split
    eval: AttackConfig = field(default_factory=AttackConfig)

    def __post_init__(self) -> None:
        require(self.eps is None or self.eps > 0, "robustness.eps", self.eps, "must be > 0 or null")
        ok = self.step_size is None or self.step_size > 0
        require(ok, "robustness.step_size", self.step_size, "must be > 0 or null")
        require(self.steps >= 1, "robustness.steps", self.steps, "must be >= 1")
        require(
            self.backend in ("auto", "triton", "torch"),
            "robustness.backend",
            self.backend,
            "auto|triton|torch",
        )
        require(self.eval_samples >= 0, "robustness.eval_samples", self.eval_samples, "must be >= 0")

    def resolve(self, dataset: str) -> None:
        """Fill every null radius and step from the dataset, so later stages read plain numbers."""
        if self.eps is None:
            self.eps = DEFAULT_EPS[dataset]
        if self.step_size is None:
            self.step_size = 1.25 * self.eps if self.mode is RobustMode.fgsm_rs else _pgd_step(self.eps, self.steps)
        if self.eval.eps is None:
            self.eval.eps = self.eps
        if self.eval.step_size is None:
            self.eval.step_size = _pgd_step(self.eval.eps, self.eval.steps)


# ---- backdoor (issue 4): owned by aisec_train/backdoor; edit only this block ----
class BackdoorAttack(Enum):
    none = "none"
    badnets = "badnets"


class BackdoorMapping(Enum):
    all_to_one = "all_to_one"  # every poisoned sample is relabelled to ``target``
    all_to_all = "all_to_all"  # label y becomes (y + 1) mod K


class DetectionMethod(Enum):
    spectral = "spectral"  # spectral signatures (Tran et al. 2018)
    activation_clustering = "activation_clustering"  # Chen et al. 2018


class RepairMethod(Enum):
    none = "none"
    fine_pruning = "fine_pruning"  # Liu et al. 2018


class PatchPosition(Enum):
    bottom_right = "bottom_right"
    bottom_left = "bottom_left"
    top_right = "top_right"
    top_left = "top_left"


@dataclass
class BackdoorConfig:
    attack: BackdoorAttack = BackdoorAttack.none  # badnets: red-team poisoning of the training split
    rate: float = 0.1  # fraction of the (remaining) training split that is poisoned
    mapping: BackdoorMapping = BackdoorMapping.all_to_one
    target: int = 0  # all_to_one target class
    patch_size: int = 3  # trigger side in pixels: BadNets' 3x3 white square (docs/backdoor.md)
    patch_position: PatchPosition = PatchPosition.bottom_right
    patch_value: float = 1.0  # trigger pixel value on the [0, 1] scale
    clean_fraction: float = 0.2  # stratified trusted clean reserve carved from the training split before poisoning
    trusted_path: str | None = None  # the defender's own clean .npz, outside the training data (replaces the reserve)
    detection: DetectionMethod = DetectionMethod.spectral  # the one reported as backdoor.detection (both run)
    detection_k: float = 3.0  # flag samples further than k reference deviations from the trusted clean data
    filter: bool = False  # drop the flagged samples and retrain (refused under DP: see docs/backdoor.md)
    repair: RepairMethod = RepairMethod.fine_pruning
    prune_acc_drop: float = 0.02  # stop pruning before trusted-set accuracy falls further than this
    finetune_epochs: int = 30
    finetune_lr: float = 0.1  # peak of a cosine schedule that decays to 0
    finetune_batch_size: int = 32
    finetune_weight_decay: float = 0.02  # what erases the trigger path that clean data never exercises

    def __post_init__(self) -> None:
        require(0.0 < self.rate < 1.0, "backdoor.rate", self.rate, "must be in (0, 1)")
        require(self.target >= 0, "backdoor.target", self.target, "must be a class index >= 0")
        require(self.patch_size >= 1, "backdoor.patch_size", self.patch_size, "must be >= 1")
        require(0.0 <= self.patch_value <= 1.0, "backdoor.patch_value", self.patch_value, "must be in [0, 1]")
        require(0.0 < self.clean_fraction < 0.5, "backdoor.clean_fraction", self.clean_fraction, "must be in (0, 0.5)")
        require(self.detection_k > 0, "backdoor.detection_k", self.detection_k, "must be > 0")
        require(0.0 <= self.prune_acc_drop < 1.0, "backdoor.prune_acc_drop", self.prune_acc_drop, "must be in [0, 1)")
        require(self.finetune_epochs >= 0, "backdoor.finetune_epochs", self.finetune_epochs, "must be >= 0")
        require(self.finetune_lr > 0, "backdoor.finetune_lr", self.finetune_lr, "must be > 0")
        require(self.finetune_batch_size >= 1, "backdoor.finetune_batch_size", self.finetune_batch_size, "must be >= 1")
        require(self.finetune_weight_decay >= 0, "backdoor.finetune_weight_decay", self.finetune_weight_decay, ">= 0")


# ---- federated (issue 5): owned by aisec_train/federated; edit only this block ----
class FederatedMode(Enum):
    none = "none"  # central training
    fedavg = "fedavg"  # Flower FedAvg; `aggregation` says whether the server sees plaintext or ciphertexts


class Aggregation(Enum):
    plaintext = "plaintext"
    ckks = "ckks"


class PartitionKind(Enum):
    iid = "iid"
    dirichlet = "dirichlet"


@dataclass
class PartitionConfig:
    kind: PartitionKind = PartitionKind.iid
    alpha: float = 0.5  # Dirichlet concentration per class: small = skewed label mix per client
    min_size: int = 10  # every client gets at least this many training examples

    def __post_init__(self) -> None:
        require(self.alpha > 0, "federated.partition.alpha", self.alpha, "must be > 0")
        require(self.min_size >= 1, "federated.partition.min_size", self.min_size, "must be >= 1")


@dataclass
class CkksConfig:
    # Defaults: docs/he_parameters.md (fewest bytes per parameter at FedAvg error <= 1e-6).
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: list[int] = field(default_factory=lambda: [50, 30])
    global_scale_bits: int = 30
    encryption: str = "symmetric"

    def check(self) -> None:
        from aisec_train.crypto.ckks import CkksParams  # TenSEAL is imported only when CKKS is configured

        try:
            CkksParams(
                self.poly_modulus_degree, tuple(self.coeff_mod_bit_sizes), self.global_scale_bits, self.encryption
            )
        except ValueError as err:
            raise ConfigError(f"federated.ckks: {err}") from err


@dataclass
class InjectConfig:
    """Fault drills (real code paths, for tests and red-team runs): client partition ids that misbehave."""

    crash: list[int] = field(default_factory=list)  # raise inside the ClientApp after training
    nan: list[int] = field(default_factory=list)  # a NaN update (refused before encryption)
    scale: list[int] = field(default_factory=list)  # an update x1e4 (refused by the norm bound)
    round: int = 0  # the round the faults fire in; 0 = every round
    skip_client_check: bool = False  # the faulty clients skip their own check (exercises the server's)

    def __post_init__(self) -> None:
        require(self.round >= 0, "federated.inject.round", self.round, "must be >= 0 (0 = every round)")


class Engine(Enum):
    simulation = "simulation"  # Flower's simulation runtime (Ray) inside the job
    deployment = "deployment"  # a running flower-superlink with flower-supernode processes


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class DeploymentConfig:
    """Where the job submits its run when ``federated.engine=deployment`` (docs/federated.md)."""

    superlink: str = "127.0.0.1:9093"  # the SuperLink's Control API, host:port
    insecure: bool = False  # plain HTTP: refused unless the SuperLink is on the loopback interface
    root_certificates: str | None = None  # CA bundle that signed the SuperLink's TLS certificate
    timeout_s: float = 3600.0  # the whole run, from submission to the last round

    def check(self) -> None:
        host = self.superlink.rpartition(":")[0]
        ok = bool(host) and self.superlink.rpartition(":")[2].isdigit()
        require(ok, "federated.deployment.superlink", self.superlink, "must be host:port")
        loopback = host in LOOPBACK_HOSTS
        require(
            not self.insecure or loopback,
            "federated.deployment.insecure",
            self.insecure,
            f"true only for a SuperLink on the loopback interface (got host {host}); use TLS elsewhere",
        )
        require(
            self.insecure or bool(self.root_certificates),
            "federated.deployment.root_certificates",
            self.root_certificates,
            "a CA certificate path is needed unless federated.deployment.insecure=true",
        )
        require(self.timeout_s > 0, "federated.deployment.timeout_s", self.timeout_s, "must be > 0")


@dataclass
class FederatedConfig:
    mode: FederatedMode = FederatedMode.none
    aggregation: Aggregation = Aggregation.plaintext
    engine: Engine = Engine.simulation
    clients: int = 4
    rounds: int = 3
    local_epochs: int = 5
    batch_size: int = 64  # each client's logical batch (its partition is ~N/clients examples)
    lr: float | None = None  # None: train.lr
    ema_decay: float = 0.0  # weight averaging inside one local round (train.ema_decay is for central runs)
    evaluate: bool = True  # clients evaluate every round's global model on their test shard
    min_clients: int = 2  # fewer usable updates fail the round and keep the global model
    round_timeout_s: float = 300.0  # a client that has not answered by then is left out of the round
    max_update_norm: float = 50.0  # L2 bound on (local - global) weights; beyond it an update is refused
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    ckks: CkksConfig = field(default_factory=CkksConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)
    stop_after_round: int = 0  # > 0 ends the run early after that round (a resume drill); 0 = never
    # Simulation engine (Ray): resources per client and the cap on the whole Ray runtime.
    client_cpus: float = 1.0
    client_gpus: float | None = None  # None: a share of the node's GPUs when training on CUDA, else 0
    ray_num_cpus: int | None = None  # None: os.cpu_count()
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)

    def __post_init__(self) -> None:
        if self.mode is FederatedMode.none:
            return
        require(self.clients >= 1, "federated.clients", self.clients, "must be >= 1")
        require(self.rounds >= 1, "federated.rounds", self.rounds, "must be >= 1")
        require(self.local_epochs >= 1, "federated.local_epochs", self.local_epochs, "must be >= 1")
        require(self.batch_size >= 1, "federated.batch_size", self.batch_size, "must be >= 1")
        require(self.lr is None or self.lr > 0, "federated.lr", self.lr, "must be > 0 or null")
        require(0 <= self.ema_decay < 1, "federated.ema_decay", self.ema_decay, "must be in [0, 1)")
        ok = 1 <= self.min_clients <= self.clients
        require(ok, "federated.min_clients", self.min_clients, f"must be in [1, federated.clients={self.clients}]")
        require(self.round_timeout_s > 0, "federated.round_timeout_s", self.round_timeout_s, "must be > 0")
        require(self.max_update_norm > 0, "federated.max_update_norm", self.max_update_norm, "must be > 0")
        require(self.stop_after_round >= 0, "federated.stop_after_round", self.stop_after_round, "must be >= 0")
        require(self.client_cpus > 0, "federated.client_cpus", self.client_cpus, "must be > 0")
        ok = self.client_gpus is None or 0 <= self.client_gpus <= 1
        require(ok, "federated.client_gpus", self.client_gpus, "must be in [0, 1] or null")
        ok = self.ray_num_cpus is None or self.ray_num_cpus >= 1
        require(ok, "federated.ray_num_cpus", self.ray_num_cpus, "must be >= 1 or null")
        ids = self.inject.crash + self.inject.nan + self.inject.scale
        ok = all(0 <= i < self.clients for i in ids)
        require(ok, "federated.inject", ids, f"client ids must be in [0, {self.clients})")
        if self.engine is Engine.deployment:
            self.deployment.check()
        if self.aggregation is Aggregation.ckks:
            self.ckks.check()


# ---- audit (issue 6): owned by aisec_train/audit; edit only this block ----
class OutputPolicy(Enum):
    probs = "probs"  # the full probability vector
    top_k = "top_k"  # the k largest probabilities, the rest zeroed
    label = "label"  # the predicted class only (one-hot)


class RiskLevel(Enum):
    low = "low"
    medium = "medium"
    high = "high"


@dataclass
class MembershipAuditConfig:
    targets: int = 1000  # members and non-members each (balanced); capped by the held-out split and n_train / 2
    reference_models: int = 2  # offline LiRA: OUT models trained by the same train() on half of the attacker pool
    reference_epochs: int | None = None  # None = train.epochs (a faithful mimic); fewer = cheaper (docs/audits.md)
    max_auc: float = 0.6  # checklist: a non-private model passes only below this attack AUC

    def __post_init__(self) -> None:
        require(self.targets >= 10, "audit.membership.targets", self.targets, "must be >= 10")
        require(self.reference_models >= 0, "audit.membership.reference_models", self.reference_models, "must be >= 0")
        require(0.5 <= self.max_auc <= 1, "audit.membership.max_auc", self.max_auc, "must be in [0.5, 1]")
        if self.reference_epochs is not None:
            require(self.reference_epochs >= 1, "audit.membership.reference_epochs", self.reference_epochs, ">= 1")


@dataclass
class GuardConfig:
    output: OutputPolicy = OutputPolicy.label
    top_k: int = 3
    round_decimals: int | None = None  # round released probabilities; None = no rounding
    noise_std: float = 0.0  # Gaussian noise on released probabilities (renormalised)
    bit_depth: int = 0  # input sanitisation: quantise to 2^bits levels; 0 = off
    smoothing: int = 0  # input sanitisation: median filter of this odd size; 0 = off
    query_budget: int = 150  # queries (samples) per client over the guard's lifetime; 0 = unlimited
    rate_limit: float = 0.0  # sustained queries per second per client (token bucket); 0 = unlimited
    burst: int = 1000  # token-bucket size for the rate limit

    def __post_init__(self) -> None:
        require(self.top_k >= 1, "audit.guard.top_k", self.top_k, "must be >= 1")
        if self.round_decimals is not None:
            require(0 <= self.round_decimals <= 8, "audit.guard.round_decimals", self.round_decimals, "0..8")
        require(self.noise_std >= 0, "audit.guard.noise_std", self.noise_std, "must be >= 0")
        require(0 <= self.bit_depth <= 8, "audit.guard.bit_depth", self.bit_depth, "0 (off) to 8")
        ok = self.smoothing == 0 or (self.smoothing >= 3 and self.smoothing % 2 == 1)
        require(ok, "audit.guard.smoothing", self.smoothing, "0 (off) or an odd size >= 3")
        require(self.query_budget >= 0, "audit.guard.query_budget", self.query_budget, "must be >= 0")
        require(self.rate_limit >= 0, "audit.guard.rate_limit", self.rate_limit, "must be >= 0")
        require(self.burst >= 1, "audit.guard.burst", self.burst, "must be >= 1")


@dataclass
class ExtractionAuditConfig:
    queries: int = 500  # the attacker's planned queries (same plan with and without the guard)
    seeds: int = 3  # attacker seeds (queries and surrogate init); every comparison is paired per seed
    surrogate_epochs: int = 30
    sanitizer_bit_depth: int = 3  # the sanitiser evaluated under plain and adaptive (BPDA) PGD
    sanitizer_smoothing: int = 0
    eval_samples: int = 180  # test samples for the sanitiser's robust accuracy

    def __post_init__(self) -> None:
        require(self.queries >= 10, "audit.extraction.queries", self.queries, "must be >= 10")
        require(self.seeds >= 1, "audit.extraction.seeds", self.seeds, "must be >= 1")
        require(self.surrogate_epochs >= 1, "audit.extraction.surrogate_epochs", self.surrogate_epochs, ">= 1")
        require(
            1 <= self.sanitizer_bit_depth <= 8, "audit.extraction.sanitizer_bit_depth", self.sanitizer_bit_depth, "1..8"
        )
        ok = self.sanitizer_smoothing == 0 or (self.sanitizer_smoothing >= 3 and self.sanitizer_smoothing % 2 == 1)
        require(ok, "audit.extraction.sanitizer_smoothing", self.sanitizer_smoothing, "0 (off) or an odd size >= 3")
        require(self.eval_samples >= 1, "audit.extraction.eval_samples", self.eval_samples, "must be >= 1")


@dataclass
class MonitorConfig:
    drift_threshold: float = 4.0  # overall drift score (mean squared per-feature z) that raises an alarm
    feature_threshold: float = 6.0  # |z| above which one feature is listed as drifted
    confidence_threshold: float = 4.0  # z of the drop in mean confidence that raises an alarm

    def __post_init__(self) -> None:
        for key in ("drift_threshold", "feature_threshold", "confidence_threshold"):
            require(getattr(self, key) > 0, f"audit.monitor.{key}", getattr(self, key), "must be > 0")


@dataclass
class AuditConfig:
    enabled: bool = True
    membership: MembershipAuditConfig = field(default_factory=MembershipAuditConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    extraction: ExtractionAuditConfig = field(default_factory=ExtractionAuditConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # None: $AISEC_TRAIN_REGISTRY, else outputs/registry.json under the launch directory (docs/audits.md)
    registry_path: str | None = None
    cpu_threads: int = 1  # torch threads while auditing on the CPU; 0 = as configured (trade-off: docs/audits.md)
    # governance fields recorded with every registered model
    purpose: str = "research: evaluation of privacy-preserving, attack-hardened training"
    data_sources: list[str] = field(default_factory=list)  # declared sources; the measured manifest is added
    owner: str = "unassigned"
    risk_level: RiskLevel = RiskLevel.medium

    def __post_init__(self) -> None:
        require(self.cpu_threads >= 0, "audit.cpu_threads", self.cpu_threads, "must be >= 0 (0: leave as is)")


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Turn the composed Hydra config into the typed dataclasses, running every range check."""
    cfg_obj = OmegaConf.to_object(cfg)
    assert isinstance(cfg_obj, Config)
    cfg_obj.robustness.resolve(cfg_obj.dataset.name.value)
    return cfg_obj

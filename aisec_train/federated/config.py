"""The schema of the ``federated`` group, next to the code that reads it (range checks in ``__post_init__``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from aisec_train.errors import ConfigError, require


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

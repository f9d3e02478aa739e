"""The schema of the ``federated`` group, next to the code that reads it (range checks in ``__post_init__``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from aisec_train.errors import ConfigError, require
from aisec_train.train.config import MIN_NOISE_MULTIPLIER, finite_positive


class FederatedMode(Enum):
    none = "none"  # central training
    fedavg = "fedavg"  # Flower FedAvg; `aggregation` says whether the server sees plaintext or ciphertexts


class Aggregation(Enum):
    plaintext = "plaintext"
    ckks = "ckks"


class PartitionKind(Enum):
    iid = "iid"
    dirichlet = "dirichlet"
    shards = "shards"  # pathological: label-sorted blocks, shards_per_client each (McMahan et al. 2017)


@dataclass
class PartitionConfig:
    """Read by :func:`aisec_train.federated.partition.client_partition` (flwr-datasets' partitioners)."""

    kind: PartitionKind = PartitionKind.iid
    alpha: float = 0.5  # Dirichlet concentration per class: small = skewed label mix per client
    min_size: int = 10  # Dirichlet: every client gets at least this many training examples
    self_balancing: bool = True  # Dirichlet: stop filling clients above the mean size (keeps 100 clients usable)
    shards_per_client: int = 2  # shards: label-sorted blocks per client
    drop_remainder: bool = True  # shards: leave out the examples the blocks do not divide (reported as dropped)

    def __post_init__(self) -> None:
        finite_positive(self.alpha, "federated.partition.alpha")
        require(self.min_size >= 1, "federated.partition.min_size", self.min_size, "must be >= 1")
        ok = self.shards_per_client >= 1
        require(ok, "federated.partition.shards_per_client", self.shards_per_client, "must be >= 1")


class FederatedDP(Enum):
    """The unit of privacy of a federated run (docs/federated.md, "Client-level DP")."""

    record = "record"  # each client runs DP-SGD with its own ledger (privacy=dpsgd): protects one example
    client = "client"  # DP-FedAvg: clipped updates + distributed noise shares (privacy=none): protects a client
    none = "none"  # no DP (privacy=none)


@dataclass
class ClientDPConfig:
    """DP-FedAvg (``federated.dp=client``): the client-level budget and clipping, separate from ``privacy``."""

    target_epsilon: float | None = 3.0  # client-level budget over all rounds; calibrates the noise
    delta: float = 1e-5  # should be below 1 / federated.clients
    noise_multiplier: float | None = None  # explicit z instead of calibration from target_epsilon
    accountant: str = "rdp"  # Opacus accountant: rdp, prv or gdp
    clip_norm: float = 1.0  # L2 bound C on each update (local - global); the initial C under adaptive clipping
    dropout_tolerance: int = 0  # shares sized so the sum keeps std z C with this many clients missing
    server_lr: float = 1.0  # global step = server_lr * sum of shares / expected cohort
    adaptive: bool = False  # adaptive clipping (Andrew et al. 2021): C follows a quantile of the update norms
    target_quantile: float = 0.5
    clip_lr: float = 0.2  # geometric step of C per round
    count_stddev: float | None = None  # noise on the clipped count; None: expected cohort / 20 (the paper's)
    secure_noise: bool = True  # OS entropy; false: seeded from train.seed (replayable: experiments only)

    def check(self) -> None:
        # The central DP path's limits (preflight.check_accountant_limits, privacy.noise_multiplier): the noise search
        # for epsilon 1e30 never ends, and z = 0 divides the accountants by zero and leaves no guarantee to report.
        from aisec_train.privacy.ledger_rules import MAX_TARGET_EPSILON

        eps, z = self.target_epsilon, self.noise_multiplier
        ok = eps is None or (math.isfinite(eps) and 0 < eps <= MAX_TARGET_EPSILON)
        allowed = f"must be in (0, {MAX_TARGET_EPSILON:g}] or null (a larger epsilon guarantees nothing; "
        require(ok, "federated.client_dp.target_epsilon", eps, allowed + "federated.dp=none trains without DP)")
        ok = z is None or (math.isfinite(z) and z >= MIN_NOISE_MULTIPLIER)
        allowed = f"must be a finite number >= {MIN_NOISE_MULTIPLIER:g} or null (federated.dp=none: no DP)"
        require(ok, "federated.client_dp.noise_multiplier", z, allowed)
        ok = eps is not None or z is not None
        require(ok, "federated.client_dp.target_epsilon", eps, "set it or federated.client_dp.noise_multiplier")
        require(0 < self.delta < 1, "federated.client_dp.delta", self.delta, "must be in (0, 1)")
        ok = self.accountant in ("rdp", "prv", "gdp")
        require(ok, "federated.client_dp.accountant", self.accountant, "use one of ['rdp', 'prv', 'gdp']")
        finite_positive(self.clip_norm, "federated.client_dp.clip_norm")
        ok = self.dropout_tolerance >= 0
        require(ok, "federated.client_dp.dropout_tolerance", self.dropout_tolerance, "must be >= 0")
        finite_positive(self.server_lr, "federated.client_dp.server_lr")
        ok = 0 <= self.target_quantile <= 1
        require(ok, "federated.client_dp.target_quantile", self.target_quantile, "must be in [0, 1]")
        finite_positive(self.clip_lr, "federated.client_dp.clip_lr")
        ok = self.count_stddev is None or (math.isfinite(self.count_stddev) and self.count_stddev > 0)
        require(ok, "federated.client_dp.count_stddev", self.count_stddev, "must be a finite number > 0, or null")


def dp_level(fed: FederatedConfig, private: bool) -> FederatedDP:
    """``federated.dp`` resolved: null follows ``privacy`` (record-level DP-SGD on clients, or none)."""
    if fed.dp is not None:
        return fed.dp
    return FederatedDP.record if private else FederatedDP.none


class Defence(Enum):
    fedavg = "fedavg"
    median = "median"
    trimmed_mean = "trimmed_mean"
    krum = "krum"
    norm_bound = "norm_bound"


CIPHERTEXT_REFUSED = (Defence.median, Defence.trimmed_mean, Defence.krum)


@dataclass
class DefenceConfig:
    """Robust aggregation (federated/robust_aggregation.py); only fedavg and norm_bound run under CKKS."""

    name: Defence = Defence.fedavg
    num_malicious: int = 1  # attackers assumed per round (Krum's f; checked against the cohort)
    trim_fraction: float = 0.2  # trimmed_mean: cut per side
    krum_select: int = 1  # > 1: MultiKrum averages the krum_select best
    norm_bound: float = 5.0  # norm_bound: each update scaled to L2 <= this (server on plaintext, client under CKKS)

    def check(self) -> None:
        require(self.num_malicious >= 0, "federated.defence.num_malicious", self.num_malicious, "must be >= 0")
        ok = 0 <= self.trim_fraction < 0.5
        require(ok, "federated.defence.trim_fraction", self.trim_fraction, "must be in [0, 0.5)")
        require(self.krum_select >= 1, "federated.defence.krum_select", self.krum_select, "must be >= 1")
        finite_positive(self.norm_bound, "federated.defence.norm_bound")


@dataclass
class CkksConfig:
    # Defaults: docs/he_parameters.md (fewest bytes per parameter at FedAvg error <= 1e-6).
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: list[int] = field(default_factory=lambda: [50, 30])
    global_scale_bits: int = 30
    encryption: str = "symmetric"
    rotate_every: int = 0  # > 0: a fresh secret key every k rounds (crypto/rotation.py); 0: one key per run

    def check(self) -> None:
        from aisec_train.crypto.ckks import CkksParams  # TenSEAL is imported only when CKKS is configured

        require(self.rotate_every >= 0, "federated.ckks.rotate_every", self.rotate_every, "must be >= 0 (0 = never)")

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
    skip_clip: list[int] = field(default_factory=list)  # clients that skip the client-side norm_bound clip (CKKS)

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
        host, _, port = self.superlink.rpartition(":")
        ok = bool(host) and port.isdigit() and 1 <= int(port) <= 65535
        require(ok, "federated.deployment.superlink", self.superlink, "must be host:port with a port in 1..65535")
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
    fraction_train: float = 1.0  # clients sampled per round (Poisson with this rate when dp=client)
    fraction_evaluate: float = 1.0  # clients that evaluate each round's model on their test shard
    dp: FederatedDP | None = None  # null: record with privacy=dpsgd, none with privacy=none
    min_clients: int = 2  # fewer usable updates fail the round and keep the global model
    round_timeout_s: float = 300.0  # a client that has not answered by then is left out of the round
    max_update_norm: float = 50.0  # L2 bound on (local - global) weights; beyond it an update is refused
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    ckks: CkksConfig = field(default_factory=CkksConfig)
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
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
        ok = self.lr is None or (math.isfinite(self.lr) and self.lr > 0)
        require(ok, "federated.lr", self.lr, "must be a finite number > 0, or null (train.lr)")
        require(0 <= self.ema_decay < 1, "federated.ema_decay", self.ema_decay, "must be in [0, 1)")
        ok = 1 <= self.min_clients <= self.clients
        require(ok, "federated.min_clients", self.min_clients, f"must be in [1, federated.clients={self.clients}]")
        require(self.round_timeout_s > 0, "federated.round_timeout_s", self.round_timeout_s, "must be > 0")
        finite_positive(self.max_update_norm, "federated.max_update_norm")
        ok = 0 < self.fraction_train <= 1
        require(ok, "federated.fraction_train", self.fraction_train, "must be in (0, 1]")
        ok = 0 < self.fraction_evaluate <= 1
        require(ok, "federated.fraction_evaluate", self.fraction_evaluate, "must be in (0, 1]")
        require(self.stop_after_round >= 0, "federated.stop_after_round", self.stop_after_round, "must be >= 0")
        require(self.client_cpus > 0, "federated.client_cpus", self.client_cpus, "must be > 0")
        ok = self.client_gpus is None or 0 <= self.client_gpus <= 1
        require(ok, "federated.client_gpus", self.client_gpus, "must be in [0, 1] or null")
        ok = self.ray_num_cpus is None or self.ray_num_cpus >= 1
        require(ok, "federated.ray_num_cpus", self.ray_num_cpus, "must be >= 1 or null")
        ids = self.inject.crash + self.inject.nan + self.inject.scale + self.inject.skip_clip
        ok = all(0 <= i < self.clients for i in ids)
        require(ok, "federated.inject", ids, f"client ids must be in [0, {self.clients})")
        if self.engine is Engine.deployment:
            self.deployment.check()
        ok = self.ckks.rotate_every == 0 or self.aggregation is Aggregation.ckks
        require(ok, "federated.ckks.rotate_every", self.ckks.rotate_every, "0 unless federated.aggregation=ckks")
        if self.aggregation is Aggregation.ckks:
            self.ckks.check()
        self.defence.check()
        self._check_defence()
        if self.dp is FederatedDP.client:
            self.client_dp.check()
            self._check_client_dp()

    @property
    def cohort(self) -> int:
        """Clients asked per round (the expected cohort ``q N`` under Poisson sampling, rounded down)."""
        return max(int(self.clients * self.fraction_train), 1)

    def _check_defence(self) -> None:
        name = self.defence.name
        if self.aggregation is Aggregation.ckks and name in CIPHERTEXT_REFUSED:
            raise ConfigError(
                f"federated.defence={name.value!r} is not allowed with federated.aggregation=ckks: the server holds "
                "ciphertexts and can only add them, it cannot compare, sort or measure updates; allowed: fedavg, "
                "norm_bound (a client-side clip the server cannot verify), or federated.aggregation=plaintext"
            )
        if name is Defence.fedavg or name is Defence.norm_bound:
            return
        from aisec_train.federated.robust_aggregation import check_defence  # Flower's strategies: only when used

        d = self.defence
        check_defence(name.value, max(self.cohort, self.min_clients), num_malicious=d.num_malicious,
                      trim_fraction=d.trim_fraction)  # fmt: skip

    def _check_client_dp(self) -> None:
        if self.defence.name is not Defence.fedavg:
            raise ConfigError(
                f"federated.defence={self.defence.name.value!r} is not allowed with federated.dp=client: the noise "
                "shares are only calibrated for their sum, and a median, trim or Krum pick reads single shares; "
                "clipping to federated.client_dp.clip_norm already bounds every update (use defence=fedavg)"
            )
        tol = self.client_dp.dropout_tolerance
        ok = tol < self.cohort
        require(ok, "federated.client_dp.dropout_tolerance", tol, f"must be < the cohort {self.cohort}")


def check_local_limits(fed: FederatedConfig, cpus: int | None = None) -> None:
    """What the launching job checks before any work (preflight.check_resource_limits), but a SuperNode or the
    ServerApp rebuilding the config from job.json must not: they run elsewhere, with their own files and cores.

    - Flower's Ray backend starts ``ray_num_cpus / client_cpus`` client actors whatever ``clients`` is (each a
      Python process importing torch and TenSEAL), so ``client_cpus=0.001`` started thousands.
    - ``flwr run`` reads the CA bundle only after the keys, the job file and the budget admission were written.
    """
    if fed.mode is FederatedMode.none:
        return
    cores = cpus or os.cpu_count() or 1
    most = max(8, 4 * cores)
    if fed.engine is Engine.simulation:
        actors = (fed.ray_num_cpus or cores) / fed.client_cpus
        big = (fed.ray_num_cpus or 0) > most
        require(
            actors <= most,
            "federated.ray_num_cpus" if big else "federated.client_cpus",
            fed.ray_num_cpus if big else fed.client_cpus,
            f"federated.ray_num_cpus / federated.client_cpus = {actors:g} Ray client actors (processes); at most "
            f"{most} (4 per CPU core): raise client_cpus or lower ray_num_cpus",
        )
    elif not fed.deployment.insecure:
        ca = Path(str(fed.deployment.root_certificates))
        ok = ca.is_file() and os.access(ca, os.R_OK)
        require(ok, "federated.deployment.root_certificates", str(ca), "must be a readable CA certificate file")

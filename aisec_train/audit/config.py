"""The schema of the ``audit`` group, next to the code that reads it (range checks in ``__post_init__``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from aisec_train.errors import require


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
    rate_limit: float = 100.0  # sustained queries per second per client (token bucket); 0 = unlimited
    burst: int = 1000  # token-bucket size for the rate limit

    def __post_init__(self) -> None:
        require(self.top_k >= 1, "audit.guard.top_k", self.top_k, "must be >= 1")
        if self.round_decimals is not None:
            require(0 <= self.round_decimals <= 8, "audit.guard.round_decimals", self.round_decimals, "0..8")
        ok = math.isfinite(self.noise_std) and self.noise_std >= 0
        require(ok, "audit.guard.noise_std", self.noise_std, "must be a finite number >= 0")
        require(0 <= self.bit_depth <= 8, "audit.guard.bit_depth", self.bit_depth, "0 (off) to 8")
        ok = self.smoothing == 0 or (self.smoothing >= 3 and self.smoothing % 2 == 1)
        require(ok, "audit.guard.smoothing", self.smoothing, "0 (off) or an odd size >= 3")
        require(self.query_budget >= 0, "audit.guard.query_budget", self.query_budget, "must be >= 0")
        ok = math.isfinite(self.rate_limit) and self.rate_limit >= 0  # 0, not inf, is "unlimited"
        require(ok, "audit.guard.rate_limit", self.rate_limit, "must be a finite number >= 0 (0: unlimited)")
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
            value = getattr(self, key)
            require(math.isfinite(value) and value > 0, f"audit.monitor.{key}", value, "must be a finite number > 0")


class CanaryKind(Enum):
    mislabel = "mislabel"  # training samples given a wrong label (Steinke et al.'s default for input space)
    noise = "noise"  # crafted inputs: uniform-noise images with random labels, outside the data distribution


@dataclass
class CanaryConfig:
    """The one-run privacy audit's canaries (docs/audits.md)."""

    m: int = 500  # canaries, each included with probability 1/2
    kind: CanaryKind = CanaryKind.mislabel
    confidence: float = 0.95

    def __post_init__(self) -> None:
        require(self.m >= 20, "audit.canaries.m", self.m, "must be >= 20")
        require(0.5 <= self.confidence < 1, "audit.canaries.confidence", self.confidence, "must be in [0.5, 1)")


@dataclass
class AuditConfig:
    enabled: bool = True
    membership: MembershipAuditConfig = field(default_factory=MembershipAuditConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    extraction: ExtractionAuditConfig = field(default_factory=ExtractionAuditConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # One-run privacy audit (Steinke, Nasr & Jagielski 2023): trains one more model, with canaries; `on` / `off`.
    privacy_audit: bool = False
    canaries: CanaryConfig = field(default_factory=CanaryConfig)
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

"""Client-level DP (``federated.dp=client``) wired into the apps: the plan, each client's contribution, the
decoding of the released aggregate, and the server's client-level ledger.

The mechanism is :mod:`aisec_train.federated.client_dp` (DP-FedAvg with distributed noise shares). What this
module adds is the wire format that lets the *same* addition-only aggregation (plaintext mean or CKKS sum)
release DP-FedAvg's step without the server ever holding an unnoised update:

    client i (of a cohort of m sampled):  u_i = [ g + s * share_i ,  s_c * count_i ,  C ]
                                          s = server_lr * m / (q N),  s_c = m / (q N)
    server (mean over r replies):         mean(u) = [ g + (m / r) server_lr * sum(share) / (q N), ..., C ]

With every sampled client answering (``r = m``) the first block is exactly DP-FedAvg's global model
``g + server_lr * sum(share) / (q N)`` (fixed denominator); with tolerated dropouts it is the same noised sum
scaled by the public ``m / r`` (post-processing). The second block is the noisy clipped count over ``q N``
(adaptive clipping), the third carries ``C``, so the stateless clients that decrypt the aggregate next
round all derive the same next ``C``. Every block is a function of the noised sum only.

The server is the accountant: it samples (Poisson, rate ``q = fraction_train``), so it charges one
subsampled-Gaussian step per configured round to a :class:`~aisec_train.privacy.ledger.PrivacyLedger` kept
in its state folder (``client_dp_ledger.pt``), before the round's messages leave, released or not.

Example::

    plan = make_plan(cfg.federated)
    u = contribution(delta, global_flat, plan, cohort=m, clip_norm=C, rng=rng)      # client, then encrypt
    weights, next_c = decode(decrypted_mean, num_params, plan)                      # client, next round
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from aisec_train.federated.client_dp import (
    calibrate_noise_multiplier,
    charge_round,
    new_client_ledger,
    next_clip_norm,
    privatize_update,
    split_noise,
)
from aisec_train.federated.config import FederatedConfig
from aisec_train.privacy.ledger import PrivacyLedger
from aisec_train.train import checkpoint

EXTRA = 2  # values appended to a DP contribution: the scaled count share and the clip norm C
EXTRA_KEYS = ("dp.count", "dp.clip")  # the same two values as arrays of a plaintext ArrayRecord
LEDGER_FILE = "client_dp_ledger.pt"


@dataclass(frozen=True)
class ClientDPPlan:
    noise_multiplier: float  # z, what the accountant charges per round
    update_noise: float  # z applied to the update (split from z under adaptive clipping)
    count_stddev: float | None  # sigma_b of the clipped count (adaptive clipping only)
    sample_rate: float  # q: Poisson client sampling
    expected_cohort: float  # q N, DP-FedAvg's fixed denominator
    clip_norm: float  # C (the initial C under adaptive clipping)
    dropout_tolerance: int
    server_lr: float
    adaptive: bool
    target_quantile: float
    clip_lr: float
    accountant: str
    delta: float
    target_epsilon: float | None
    rounds: int

    def as_report(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(fed: FederatedConfig) -> ClientDPPlan:
    """The run's DP-FedAvg parameters; ``z`` calibrated so ``fed.rounds`` rounds end at the target epsilon."""
    c = fed.client_dp
    return _plan(
        c.target_epsilon, c.delta, c.noise_multiplier, c.accountant, c.clip_norm, c.dropout_tolerance, c.server_lr,
        c.adaptive, c.target_quantile, c.clip_lr, c.count_stddev, fed.fraction_train, fed.clients, fed.rounds,
    )  # fmt: skip


@lru_cache(maxsize=8)  # every client of every round asks; Opacus' calibration search takes a second
def _plan(eps, delta, z, accountant, clip, tol, server_lr, adaptive, quantile, clip_lr, sigma_b, q, n, rounds):
    if z is None:
        z = calibrate_noise_multiplier(eps, delta, q, rounds, accountant)
    expected = q * n
    count_stddev = (sigma_b if sigma_b is not None else expected / 20.0) if adaptive else None
    update = split_noise(z, count_stddev) if adaptive else z  # refuses a z the count noise cannot share
    return ClientDPPlan(
        z, update, count_stddev, q, expected, clip, tol, server_lr, adaptive, quantile, clip_lr, accountant, delta,
        eps, rounds,
    )  # fmt: skip


def tolerance(plan: ClientDPPlan, cohort: int) -> int:
    """The dropout tolerance this cohort can carry (at least one share must hold all the noise)."""
    return max(0, min(plan.dropout_tolerance, cohort - 1))


def contribution(
    delta: np.ndarray,
    global_flat: np.ndarray,
    plan: ClientDPPlan,
    *,
    cohort: int,
    clip_norm: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """What one sampled client sends (module docstring), and its update's norm before clipping (kept local)."""
    share = privatize_update(
        delta,
        clip_norm=clip_norm,
        noise_multiplier=plan.update_noise,
        cohort=cohort,
        rng=rng,
        dropout_tolerance=tolerance(plan, cohort),
        count_stddev=plan.count_stddev,
    )
    scale = cohort / plan.expected_cohort
    vector = np.concatenate([global_flat + plan.server_lr * scale * share.update, [scale * share.count, clip_norm]])
    return vector, share.norm


def decode(vector: np.ndarray, num_params: int, plan: ClientDPPlan) -> tuple[np.ndarray, float]:
    """The global weights in a released aggregate, and the clip norm for the next round.

    The initial model carries no extras: the next ``C`` is then the configured one. Without adaptive clipping it is
    always the configured one: the ``C`` an aggregate carries is whatever the server put there (a plaintext value,
    or a plaintext added to a ciphertext), and a larger ``C`` for one client than for the others would leave its
    update with less noise than the accountant charged, relative to its clip.
    """
    if vector.size == num_params:
        return vector, plan.clip_norm
    if vector.size != num_params + EXTRA:
        raise ValueError(f"a DP aggregate has {vector.size} values, expected {num_params} + {EXTRA}")
    weights, count_term, clip = vector[:num_params], float(vector[num_params]), float(vector[num_params + 1])
    if not plan.adaptive:
        return weights, plan.clip_norm
    count_sum = count_term * plan.expected_cohort
    return weights, next_clip_norm(clip, count_sum, plan.expected_cohort, plan.target_quantile, plan.clip_lr)


# ---- the server's client-level ledger ----------------------------------------------------------------------
class ClientLedger:
    """The client-level account, in the server's state folder: one step per configured round."""

    def __init__(self, state_dir: Path, plan: ClientDPPlan):
        self.path, self.plan = Path(state_dir) / LEDGER_FILE, plan
        self.ledger = new_client_ledger(plan.noise_multiplier, plan.sample_rate, plan.delta, plan.accountant)
        self.rounds: list[int] = []
        if self.path.exists():
            saved = checkpoint.load(self.path)
            self.ledger.load_state_dict(saved["ledger"])
            self.rounds = list(saved["rounds"])

    def fits_one_more(self) -> bool:
        """Whether charging one more round keeps epsilon within the target (always, without a target)."""
        if self.plan.target_epsilon is None:
            return True
        allowed = self.ledger.steps_within(self.plan.target_epsilon + 1e-9, limit=self.ledger.steps + 1)
        return allowed > self.ledger.steps

    def charge(self, server_round: int) -> None:
        """Charge and persist before the round's messages leave (a crash after it over-counts, never under)."""
        charge_round(self.ledger)
        self.rounds.append(server_round)
        checkpoint.save({"ledger": self.ledger.state_dict(), "rounds": self.rounds}, self.path)

    def summary(self) -> dict[str, Any]:
        return {**self.ledger.summary(), "rounds_charged": list(self.rounds)}


def read_ledger(state_dir: Path, accountant: str, delta: float) -> dict[str, Any] | None:
    """The saved client-level ledger's summary (for the report), or None when no round was charged."""
    path = Path(state_dir) / LEDGER_FILE
    if not path.exists():
        return None
    saved = checkpoint.load(path)
    ledger = PrivacyLedger(accountant, delta)
    ledger.load_state_dict(saved["ledger"])
    return {**ledger.summary(), "rounds_charged": list(saved["rounds"])}


def noise_std_of_sum(plan: ClientDPPlan) -> float:
    """Per-coordinate std of the noise in the released global step: ``server_lr z C / (q N)`` (initial C)."""
    return plan.server_lr * plan.update_noise * plan.clip_norm / plan.expected_cohort if plan.clip_norm else math.nan

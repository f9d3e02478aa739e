"""Client-level DP (DP-FedAvg, McMahan et al. 2018) with distributed noise, so it also runs under CKKS.

The unit of privacy is a whole client: its entire local data may be added or removed (add/remove
adjacency), and the released sequence of global models changes little. Each sampled client

1. clips its model update (local - global) to L2 norm ``C`` (:func:`clip_update`),
2. adds its *share* of the Gaussian noise, N(0, z^2 C^2 / k) per coordinate, where ``k = cohort -
   dropout_tolerance`` (:func:`privatize_update`): any ``>= k`` shares sum to noise of std ``>= z C``,
   the Gaussian mechanism that the accountant charges,
3. sends it (encrypted under CKKS); the server only adds. The global step is the *unweighted* sum over the
   replies divided by the fixed expected cohort ``q N`` (:func:`dp_mean`, DP-FedAvg's fixed denominator).

Dropouts: with ``r`` replies the sum carries noise std ``z C sqrt(r / k)``. A round is released only when
``r >= k`` (:func:`check_release`); clients pay for the tolerance with ``sqrt(cohort / k)`` times the
noise when everyone answers. The cohort is the number the server actually sampled this round (it tells
the clients; sampling is data-independent); dropouts are assumed independent of the clients' data.

What each party sees:

- **CKKS**: the server sees ciphertexts, their count and plaintext metrics only (a client must not put
  its norm or clipping bit in plaintext metrics). Key-holding clients decrypt only the *sum*, which
  carries the full noise: the released model is (epsilon, delta)-DP at the client level. A client
  colluding with the server decrypts each upload, which carries one share only (std ``z C / sqrt(k)``):
  weak protection (the threat model of single-key CKKS, docs/federated.md).
- **plaintext, distributed noise** (this module): the server sees each noised share (as above).
- **plaintext, Flower's central DP** (:func:`flower_central_dp`): the server sees every unnoised update
  (a trusted curator) and adds all the noise itself; only the released model is DP.

Adaptive clipping (Andrew et al. 2021): each client also sends its centred bit ``1[norm <= C] - 1/2``
plus a noise share of the count noise ``sigma_b`` (under CKKS, as its own one-value ciphertext); the
clients who decrypt the noisy count compute the next ``C`` with :func:`next_clip_norm` (a DP release, so
the new ``C`` may travel in plaintext). The update noise is :func:`split_noise` so that the pair is
charged as one Gaussian mechanism with the accounted ``z`` (Theorem 1 there).

Noise comes from the caller's ``numpy.random.Generator`` (tests seed it; production passes a generator
seeded from OS entropy). Like Opacus without ``secure_mode``, it is not hardened against floating-point
attacks on the sampler.

Example::

    z = calibrate_noise_multiplier(3.0, 1e-5, sample_rate=0.1, rounds=50)
    share = privatize_update(delta, clip_norm=1.0, noise_multiplier=z, cohort=10, rng=rng)   # each client
    step = dp_mean(sum_of_shares, expected_cohort=10)                                         # after the sum
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from aisec_train.errors import ConfigError, require
from aisec_train.privacy.ledger import PrivacyLedger

ACCOUNTANTS = ("rdp", "prv", "gdp")
SAMPLING = ("poisson", "fixed")
FIXED_SAMPLING_CAVEAT = (
    "fixed-size client sampling accounted with the Poisson-subsampling analysis: an approximation, "
    "not a proven bound (Lebeda et al. 2024)"
)


class ReleaseRefused(RuntimeError):
    """Too few noise shares arrived: the sum would carry less noise than the accountant charged."""


# ---- clipping and noise shares ----------------------------------------------------------------------------
def _flat(delta: np.ndarray) -> np.ndarray:
    arr = np.asarray(delta, dtype=np.float64)
    if arr.ndim != 1 or not np.isfinite(arr).all():
        raise ValueError(f"an update must be a flat finite vector, got shape {arr.shape} (or NaN/inf)")
    return arr


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``delta`` scaled to L2 norm <= ``clip_norm`` (direction kept), and its norm before clipping."""
    require(clip_norm > 0, "federated.dp.clip_norm", clip_norm, "must be > 0")
    arr = _flat(delta)
    norm = float(np.linalg.norm(arr))
    return (arr * (clip_norm / norm) if norm > clip_norm else arr.copy()), norm


def noise_share_std(noise_multiplier: float, clip_norm: float, cohort: int, dropout_tolerance: int = 0) -> float:
    """Per-coordinate std of one client's share: ``k = cohort - dropout_tolerance`` shares sum to std ``z C``."""
    require(noise_multiplier >= 0, "federated.dp.noise_multiplier", noise_multiplier, "must be >= 0")
    ok = 0 <= dropout_tolerance < cohort
    require(ok, "federated.dp.dropout_tolerance", dropout_tolerance, f"must be in [0, cohort={cohort})")
    return noise_multiplier * clip_norm / math.sqrt(cohort - dropout_tolerance)


@dataclass(frozen=True)
class ClientShare:
    update: np.ndarray  # clipped delta + this client's noise share: what gets encrypted and sent
    count: float  # centred clipping bit + its count-noise share (adaptive clipping), else 0.0
    norm: float  # the update's norm before clipping: stays on the client


def privatize_update(
    delta: np.ndarray,
    *,
    clip_norm: float,
    noise_multiplier: float,
    cohort: int,
    rng: np.random.Generator,
    dropout_tolerance: int = 0,
    count_stddev: float | None = None,
) -> ClientShare:
    """One client's contribution: clip, add its noise share; with ``count_stddev`` also its count share.

    ``noise_multiplier`` is the one applied to the update (under adaptive clipping pass
    ``split_noise(z, count_stddev)``, not the accounted ``z``).
    """
    clipped, norm = clip_update(delta, clip_norm)
    std = noise_share_std(noise_multiplier, clip_norm, cohort, dropout_tolerance)
    update = clipped + rng.normal(0.0, std, clipped.size) if std > 0 else clipped
    count = 0.0
    if count_stddev is not None:
        require(count_stddev >= 0, "federated.dp.count_stddev", count_stddev, "must be >= 0")
        # Centred bit: its add/remove sensitivity is 1/2, which is where Theorem 1's factor 2 comes from.
        bit = (1.0 if norm <= clip_norm else 0.0) - 0.5
        count = bit + float(rng.normal(0.0, count_stddev / math.sqrt(cohort - dropout_tolerance)))
    return ClientShare(update, count, norm)


def check_release(replies: int, cohort: int, dropout_tolerance: int = 0) -> None:
    """Refuse to release (decrypt, apply) a sum of fewer than ``cohort - dropout_tolerance`` shares."""
    needed = cohort - dropout_tolerance
    if replies < needed:
        raise ReleaseRefused(
            f"{replies} noise share(s) arrived of the {needed} needed (cohort {cohort} - dropout_tolerance "
            f"{dropout_tolerance}): the sum would carry less noise than accounted; the round is not released"
        )


def dp_mean(update_sum: np.ndarray, expected_cohort: float, server_lr: float = 1.0) -> np.ndarray:
    """The global step: the sum of shares over the *fixed* expected cohort (``q N``), not over the replies."""
    require(expected_cohort > 0, "federated.dp.expected_cohort", expected_cohort, "must be > 0")
    return server_lr * np.asarray(update_sum, dtype=np.float64) / expected_cohort


def poisson_sample(node_ids: Sequence[int], sample_rate: float, rng: np.random.Generator) -> list[int]:
    """Each node independently with probability ``sample_rate``: the sampling the accountant analyses."""
    require(0 < sample_rate <= 1, "federated.fraction_train", sample_rate, "must be in (0, 1]")
    return [n for n in node_ids if rng.random() < sample_rate]


# ---- adaptive clipping (Andrew et al. 2021) ------------------------------------------------------------------
def split_noise(noise_multiplier: float, count_stddev: float) -> float:
    """Noise multiplier for the update when the clipped count takes its share: the pair is charged as ``z``.

    ``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2``; needs ``z < 2 sigma_b``.
    """
    require(noise_multiplier > 0, "federated.dp.noise_multiplier", noise_multiplier, "must be > 0 with adaptive")
    ok = noise_multiplier < 2 * count_stddev
    require(ok, "federated.dp.count_stddev", count_stddev, f"must exceed noise_multiplier/2 = {noise_multiplier / 2}")
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def next_clip_norm(
    clip_norm: float, count_sum: float, expected_cohort: float, target_quantile: float = 0.5, lr: float = 0.2
) -> float:
    """Geometric update: ``C * exp(-lr (unclipped_fraction - target))``; ``count_sum`` = sum of count shares.

    Too many updates under ``C`` (fraction above the target) shrinks ``C``; too many clipped grows it.
    """
    require(0 <= target_quantile <= 1, "federated.dp.target_quantile", target_quantile, "must be in [0, 1]")
    require(lr > 0, "federated.dp.clip_lr", lr, "must be > 0")
    unclipped = count_sum / expected_cohort + 0.5  # undo the centring
    return float(clip_norm * math.exp(-lr * (unclipped - target_quantile)))


# ---- accounting --------------------------------------------------------------------------------------------
def _check_accounting(sample_rate: float, rounds: int, delta: float, accountant: str) -> None:
    require(accountant in ACCOUNTANTS, "privacy.accountant", accountant, f"use one of {list(ACCOUNTANTS)}")
    require(0 < sample_rate <= 1, "federated.fraction_train", sample_rate, "must be in (0, 1]")
    require(rounds >= 1, "federated.rounds", rounds, "must be >= 1")
    require(0 < delta < 1, "privacy.delta", delta, "must be in (0, 1)")


def client_level_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at the client level after ``rounds`` rounds, each a subsampled Gaussian (``z``, ``q``)."""
    _check_accounting(sample_rate, rounds, delta, accountant)
    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "rdp"
) -> float:
    """The smallest ``z`` (Opacus' search, tolerance 0.01) whose epsilon after ``rounds`` stays <= target."""
    _check_accounting(sample_rate, rounds, delta, accountant)
    require(target_epsilon > 0, "privacy.target_epsilon", target_epsilon, "must be > 0")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds,
                accountant=accountant,
            )
        )
    except ValueError as err:  # e.g. a target no finite noise reaches
        raise ConfigError(f"privacy.target_epsilon={target_epsilon!r} is not reachable: {err}") from err


def new_client_ledger(noise_multiplier: float, sample_rate: float, delta: float, accountant: str) -> PrivacyLedger:
    """The project's ledger, charged once per round (one step = one round of client sampling)."""
    _check_accounting(sample_rate, 1, delta, accountant)
    ledger = PrivacyLedger(accountant, delta)
    ledger.noise_multiplier, ledger.sample_rate = noise_multiplier, sample_rate
    return ledger


def charge_round(ledger: PrivacyLedger) -> None:
    """Charge one round. Call it when the round is configured, whether or not it is later released."""
    ledger.accountant.step(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate)


# ---- plaintext: Flower's own central-DP wrapper --------------------------------------------------------------
UNIFORM_WEIGHT_KEY = "dp-weight"  # every client reports 1 under this key: DP-FedAvg weighs clients equally
# Flower 1.42's DP wrappers: (used by aisec-train, why). The report and docs/federated.md quote these.
FLOWER_DP_WRAPPERS = {
    "DifferentialPrivacyServerSideFixedClipping": (
        True,
        "plaintext only: the server clips each update and adds N(0, (z C / m)^2) to the mean; it sees every "
        "unnoised update (trusted curator). Under CKKS the server can neither clip nor see the mean",
    ),
    "DifferentialPrivacyClientSideFixedClipping": (
        False,
        "not used: clients clip (fixedclipping_mod) but the server adds all the noise, so in plaintext it "
        "gives the trust of the server-side wrapper; under CKKS the server cannot add noise to a sum it cannot "
        "read (and must not know the noise in what it releases): this module's distributed shares replace it",
    ),
    "DifferentialPrivacyServerSideAdaptiveClipping": (
        False,
        "needs plaintext updates; and Flower 1.42's rule C *= exp(-lr (clipped_fraction - target)) moves C "
        "away from the target quantile (tests/test_client_dp.py), with an uncentred count charged as centred",
    ),
    "DifferentialPrivacyClientSideAdaptiveClipping": (
        False,
        "each client's clipping bit travels unnoised in plaintext metrics, and the same update rule as above",
    ),
}


def flower_central_dp(strategy, *, noise_multiplier: float, clip_norm: float, num_sampled_clients: int):
    """Wrap a plaintext FedAvg in Flower's server-side fixed-clipping DP (central noise, trusted server).

    ``strategy`` must be a Flower ``FedAvg`` weighing replies by ``UNIFORM_WEIGHT_KEY`` (each client reports
    1), so Flower's mean is DP-FedAvg's unweighted mean. Flower divides by the replies, not by
    ``num_sampled_clients``, and skips a round with an errored reply; the caller refuses rounds with missing
    replies (:func:`check_release` with ``cohort=num_sampled_clients``). Account with this module
    (``client_level_epsilon``), not Flower's accountant, which its wrappers accept only without subsampling credit.
    """
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    ok = isinstance(strategy, FedAvg) and getattr(strategy, "weighted_by_key", None) == UNIFORM_WEIGHT_KEY
    require(ok, "strategy", type(strategy).__name__, f"a Flower FedAvg with weighted_by_key={UNIFORM_WEIGHT_KEY!r}")
    require(num_sampled_clients >= 1, "federated.dp.cohort", num_sampled_clients, "must be >= 1")
    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clip_norm, num_sampled_clients)

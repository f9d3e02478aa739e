"""Client-level DP: clipping, distributed noise shares, fixed-denominator mean, accounting, adaptive clipping.

Real Opacus accountants, real Flower DP wrapper on real Flower messages; statistical checks are seeded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant
from scipy import stats

from aisec_train.crypto import (
    CkksParams,
    aggregate,
    decrypt_aggregate,
    encrypt_update,
    generate_keys,
    load_public_context,
    load_secret_context,
)
from aisec_train.errors import ConfigError
from aisec_train.federated.client_dp import (
    UNIFORM_WEIGHT_KEY,
    ReleaseRefused,
    calibrate_noise_multiplier,
    charge_round,
    check_release,
    client_level_epsilon,
    clip_update,
    dp_mean,
    flower_central_dp,
    new_client_ledger,
    next_clip_norm,
    noise_share_std,
    poisson_sample,
    privatize_update,
    split_noise,
)
from tests.conftest import NodeGrid


# ---- clipping ---------------------------------------------------------------------------------------------
def test_clipping_bounds_the_norm_keeps_the_direction_and_leaves_small_updates_alone():
    rng = np.random.default_rng(0)
    big = rng.normal(0, 1, 1000)
    clipped, norm = clip_update(big, 2.0)
    assert norm == pytest.approx(np.linalg.norm(big)) and np.linalg.norm(clipped) == pytest.approx(2.0)
    assert np.allclose(clipped / np.linalg.norm(clipped), big / norm)
    small = big * (1.5 / norm)
    same, _ = clip_update(small, 2.0)
    assert np.array_equal(same, small) and same is not small
    with pytest.raises(ValueError, match="finite"):
        clip_update(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(ConfigError, match="federated.dp.clip_norm=0 is not allowed"):
        clip_update(big, 0)


# ---- distributed noise ---------------------------------------------------------------------------------
Z, C, D = 1.3, 0.7, 200_000  # noise multiplier, clip norm, coordinates (std estimates to ~0.2%)


def _shares(cohort: int, tolerance: int, seed: int) -> np.ndarray:
    rngs = [np.random.default_rng([seed, i]) for i in range(cohort)]  # each client its own generator
    return np.stack(
        [
            privatize_update(
                np.zeros(D), clip_norm=C, noise_multiplier=Z, cohort=cohort, rng=r, dropout_tolerance=tolerance
            ).update
            for r in rngs
        ]
    )


def test_the_sum_of_the_cohorts_noise_shares_has_std_z_times_c():
    shares = _shares(10, 0, seed=1)
    assert shares[0].std() == pytest.approx(Z * C / math.sqrt(10), rel=0.01)  # what one upload carries
    total = shares.sum(axis=0)
    assert total.std() == pytest.approx(Z * C, rel=0.01) and abs(total.mean()) < 0.01
    assert stats.kstest(total / (Z * C), "norm").pvalue > 1e-3  # Gaussian, not only the right spread
    assert abs(np.corrcoef(shares[0], shares[1])[0, 1]) < 0.01  # independent shares


def test_dropout_tolerance_keeps_the_accounted_noise_when_clients_drop():
    shares = _shares(10, 3, seed=2)  # shares sized so that any 7 of 10 carry z C
    assert noise_share_std(Z, C, 10, 3) == pytest.approx(Z * C / math.sqrt(7))
    assert shares[:7].sum(axis=0).std() == pytest.approx(Z * C, rel=0.01)
    assert shares.sum(axis=0).std() == pytest.approx(Z * C * math.sqrt(10 / 7), rel=0.01)  # the price
    check_release(7, cohort=10, dropout_tolerance=3)
    with pytest.raises(ReleaseRefused, match="6 noise share"):
        check_release(6, cohort=10, dropout_tolerance=3)
    with pytest.raises(ConfigError, match=r"dropout_tolerance=10 is not allowed: must be in \[0, cohort=10\)"):
        noise_share_std(Z, C, 10, 10)


def test_a_clipped_update_plus_noise_and_the_fixed_denominator_mean():
    rng = np.random.default_rng(3)
    deltas = [rng.normal(0, 1, 50) * s for s in (0.01, 1.0, 100.0)]
    shares = [privatize_update(d, clip_norm=1.0, noise_multiplier=0.0, cohort=3, rng=rng) for d in deltas]
    assert [round(s.norm, 6) for s in shares] == [round(float(np.linalg.norm(d)), 6) for d in deltas]
    assert max(np.linalg.norm(s.update) for s in shares) <= 1.0 + 1e-12
    total = sum(s.update for s in shares)
    # Fixed denominator: two replies of an expected four still divide by four (DP-FedAvg's estimator).
    np.testing.assert_allclose(dp_mean(total, expected_cohort=4), total / 4)
    np.testing.assert_allclose(dp_mean(total, expected_cohort=4, server_lr=2.0), total / 2)


def test_poisson_sampling_is_seeded_and_hits_the_rate():
    nodes = list(range(1000))
    a, b = poisson_sample(nodes, 0.1, np.random.default_rng(0)), poisson_sample(nodes, 0.1, np.random.default_rng(0))
    assert a == b and 70 <= len(a) <= 130


def test_under_ckks_the_server_adds_noised_shares_and_clients_decrypt_the_noised_mean(tmp_path):
    """The CKKS path: shares pre-divided by the expected cohort, summed on a key-less context, decrypted."""
    keys = generate_keys(CkksParams(), tmp_path / "client", tmp_path / "server")
    secret, public = load_secret_context(keys.secret_context), load_public_context(keys.public_context)
    rng, cohort, expected, size = np.random.default_rng(4), 6, 6.0, 20_000
    deltas = [rng.normal(0, 0.01, size) for _ in range(cohort)]
    shares = [
        privatize_update(d, clip_norm=C, noise_multiplier=Z, cohort=cohort, rng=rng, count_stddev=cohort / 20)
        for d in deltas
    ]
    uploads = [encrypt_update(s.update / expected, 1, secret).to_bytes() for s in shares]
    counts = [encrypt_update(np.array([s.count]), 1, secret).to_bytes() for s in shares]
    summed, count_sum = aggregate(uploads, public), aggregate(counts, public)  # the server: additions only
    step = decrypt_aggregate(summed, secret) * summed.weight  # a client: the raw sum of the shares
    # CKKS error: ~2e-7 per value on the mean (he_parameters.md), so ~1e-6 on this sum of six; the noise is 0.15.
    np.testing.assert_allclose(step, dp_mean(sum(s.update for s in shares), expected), atol=1e-5)
    clipped_mean = np.mean([clip_update(d, C)[0] for d in deltas], axis=0)
    assert (step - clipped_mean).std() == pytest.approx(Z * C / expected, rel=0.03)
    noisy_count = float(decrypt_aggregate(count_sum, secret)[0] * count_sum.weight)
    # The same CKKS error bound as the sum above: a 1e-6 tolerance failed CI once (1.07e-6 off) because
    # encryption noise is drawn fresh each run.
    assert noisy_count == pytest.approx(sum(s.count for s in shares), abs=1e-5)


# ---- accounting -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q, sigma, rounds", [(0.1, 1.0, 50), (0.05, 0.8, 200), (1.0, 4.0, 10)])
def test_epsilon_equals_opacus_own_computation(q, sigma, rounds):
    delta = 1e-5
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=orders)
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert client_level_epsilon(sigma, q, rounds, delta, "rdp") == pytest.approx(expected, rel=1e-9)
    ledger = new_client_ledger(sigma, q, delta, "rdp")  # the project's ledger, one charge per round
    for _ in range(rounds):
        charge_round(ledger)
    assert ledger.steps == rounds and ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    prv = PRVAccountant()
    for _ in range(rounds):
        prv.step(noise_multiplier=sigma, sample_rate=q)
    assert client_level_epsilon(sigma, q, rounds, delta, "prv") == pytest.approx(prv.get_epsilon(delta), rel=1e-6)


def test_calibrated_noise_reaches_the_target_epsilon():
    z = calibrate_noise_multiplier(3.0, 1e-5, sample_rate=0.1, rounds=100)
    assert 2.95 <= client_level_epsilon(z, 0.1, 100, 1e-5) <= 3.0
    assert client_level_epsilon(z * 0.9, 0.1, 100, 1e-5) > 3.0
    with pytest.raises(ConfigError, match=r"federated.fraction_train=1.5 is not allowed: must be in \(0, 1\]"):
        calibrate_noise_multiplier(3.0, 1e-5, sample_rate=1.5, rounds=100)


# ---- adaptive clipping -----------------------------------------------------------------------------------
def test_split_noise_charges_the_update_and_count_as_one_gaussian():
    z, sigma_b = 1.0, 5.0
    z_update = split_noise(z, sigma_b)
    assert z_update > z and z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)  # Theorem 1
    with pytest.raises(ConfigError, match="federated.dp.count_stddev=0.5 is not allowed"):
        split_noise(1.0, 0.5)


SPREAD = 0.5  # update norms ~ lognormal(0, SPREAD): P(norm <= C) = Phi(ln C / SPREAD)


def _run_adaptive(target: float, update_rule, rounds: int = 300, cohort: int = 100, seed: int = 0) -> list[float]:
    rng, clip, history = np.random.default_rng(seed), 0.1, []
    sigma_b = cohort / 20  # Andrew et al.'s recommendation
    for _ in range(rounds):
        norms = rng.lognormal(0.0, SPREAD, cohort)
        directions = rng.normal(0, 1, (cohort, 4))
        deltas = directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
        z_update = split_noise(1.0, sigma_b)
        counts = [
            privatize_update(
                d, clip_norm=clip, noise_multiplier=z_update, cohort=cohort, rng=rng, count_stddev=sigma_b
            ).count
            for d in deltas
        ]
        clip = update_rule(clip, float(np.sum(counts)), cohort, target)
        history.append(clip)
    return history


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile(target):
    history = _run_adaptive(target, lambda c, s, m, g: next_clip_norm(c, s, m, g, lr=0.2))
    unclipped = stats.norm.cdf(np.log(history[-100:]) / SPREAD)  # true fraction of norms under each C
    assert abs(float(np.mean(unclipped)) - target) < 0.03
    assert history[0] > 0.1  # from C0 = 0.1 (everything clipped) it grew


def test_flowers_adaptive_rule_moves_away_from_the_target_which_is_why_it_is_not_used():
    """Flower 1.42 multiplies C by exp(-lr (clipped_fraction - target)): the fixed point is unstable."""
    np.random.seed(0)  # Flower draws its count noise from numpy's global generator
    flower = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=1.0, num_sampled_clients=100, initial_clipping_norm=1.0, clipped_count_stddev=5.0
    )
    rng = np.random.default_rng(0)
    for _ in range(100):
        clipped = int((rng.lognormal(0.0, SPREAD, 100) > flower.clipping_norm).sum())
        flower._geometric_update(flower._noisy_fraction(clipped, 100))
    clipped_fraction = 1 - stats.norm.cdf(np.log(flower.clipping_norm) / SPREAD)
    assert abs(clipped_fraction - 0.5) > 0.4, "Flower's rule converged: reconsider using its adaptive wrappers"


# ---- plaintext: Flower's central-DP wrapper ----------------------------------------------------------------
def _flower_round(z: float, deltas: list[np.ndarray], clip: float) -> np.ndarray:
    """One round of Flower's server-side fixed-clipping wrapper around FedAvg, on real messages."""
    m = len(deltas)
    inner = FedAvg(fraction_train=1.0, min_train_nodes=m, min_available_nodes=m, weighted_by_key=UNIFORM_WEIGHT_KEY)
    strategy = flower_central_dp(inner, noise_multiplier=z, clip_norm=clip, num_sampled_clients=m)
    current = np.zeros(deltas[0].size, np.float32)
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(current)}), ConfigRecord({}), NodeGrid(m)))
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(current + d)}),
                    "metrics": MetricRecord({UNIFORM_WEIGHT_KEY: 1, "num-examples": 10**i}),  # sizes differ
                }
            ),
            reply_to=msg,
        )
        for i, (msg, d) in enumerate(zip(msgs, deltas, strict=True))
    ]
    np.random.seed(1)  # Flower's noise comes from numpy's global generator
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy().astype(np.float64)


def test_flowers_server_side_wrapper_clips_each_update_and_adds_central_noise(server_identity):
    rng = np.random.default_rng(0)
    clip, deltas = 0.5, [rng.normal(0, s, 40_000).astype(np.float32) for s in (0.001, 0.01, 0.1, 1.0)]
    clipped_mean = np.mean([clip_update(d, clip)[0] for d in deltas], axis=0)  # unweighted, despite the sizes
    # Almost no noise: the release is the unweighted mean of the clipped updates.
    np.testing.assert_allclose(_flower_round(1e-4, deltas, clip), clipped_mean, atol=1e-4)
    # z = 2: Gaussian noise of std z C / m on the mean (z C on the sum).
    assert (_flower_round(2.0, deltas, clip) - clipped_mean).std() == pytest.approx(2.0 * clip / 4, rel=0.02)


def test_flower_wrapper_refuses_an_example_weighted_strategy():
    with pytest.raises(ConfigError, match="strategy='FedAvg' is not allowed: a Flower FedAvg with weighted_by_key"):
        flower_central_dp(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, num_sampled_clients=4)

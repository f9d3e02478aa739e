"""Robust aggregation: Flower's functions against plain numpy references, a scaled attack, the CKKS table."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy import stats

from aisec_train.errors import ConfigError
from aisec_train.federated.robust_aggregation import (
    DEFENCES,
    aggregate,
    check_defence,
    ckks_summary,
    flower_strategy,
    runs_on_ciphertexts,
)
from tests.conftest import NodeGrid

RNG = np.random.default_rng(0)
UPDATES = [RNG.normal(0, 1, 64) for _ in range(9)]
WEIGHTS = [5, 10, 1, 30, 7, 7, 2, 40, 12]


def _krum_reference(updates: list[np.ndarray], f: int, select: int) -> np.ndarray:
    """Blanchard et al.: score = sum of squared distances to the n-f-2 nearest others; keep the lowest."""
    x = np.stack(updates)
    n = len(x)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(n)]
    best = np.argsort(scores)[:select]
    return x[best[0]] if select == 1 else x[best].mean(axis=0)


def test_fedavg_median_and_trimmed_mean_equal_numpy_references():
    np.testing.assert_allclose(aggregate("fedavg", UPDATES, WEIGHTS), np.average(UPDATES, axis=0, weights=WEIGHTS))
    np.testing.assert_allclose(aggregate("median", UPDATES, WEIGHTS), np.median(UPDATES, axis=0))
    np.testing.assert_allclose(
        aggregate("trimmed_mean", UPDATES, trim_fraction=0.25, num_malicious=2),
        stats.trim_mean(np.stack(UPDATES), 0.25, axis=0),
    )


@pytest.mark.parametrize("f, select", [(0, 1), (2, 1), (3, 1), (2, 4)])
def test_krum_and_multikrum_equal_the_reference(f, select):
    # Unweighted MultiKrum reference: give every update the same weight.
    got = aggregate("krum", UPDATES, None, num_malicious=f, krum_select=select)
    np.testing.assert_allclose(got, _krum_reference(UPDATES, f, select))


def test_norm_bound_clips_each_update_then_takes_the_weighted_mean():
    bound = 5.0
    clipped = [u * min(1.0, bound / np.linalg.norm(u)) for u in UPDATES]
    np.testing.assert_allclose(
        aggregate("norm_bound", UPDATES, WEIGHTS, norm_bound=bound), np.average(clipped, axis=0, weights=WEIGHTS)
    )


# ---- a scaled malicious update (model replacement, Bagdasaryan et al. 2020) -------------------------------
def _attack(n_honest: int = 10, n_bad: int = 2, scale: float = 10.0):
    rng = np.random.default_rng(1)
    target = np.full(100, 0.1)  # the honest direction (norm 1)
    honest = [target + rng.normal(0, 0.05, 100) for _ in range(n_honest)]
    bad = [-scale * target + rng.normal(0, 0.05, 100) for _ in range(n_bad)]  # boosted, pointing elsewhere
    return honest, bad, np.mean(honest, axis=0)


@pytest.mark.parametrize(
    "defence, kwargs",
    [
        ("median", {}),
        ("trimmed_mean", {"trim_fraction": 0.2}),
        ("krum", {}),
        ("krum", {"krum_select": 5}),
        ("norm_bound", {"norm_bound": 1.2}),
    ],
)
def test_a_scaled_malicious_update_is_neutralised_by_the_defences_but_not_by_fedavg(defence, kwargs):
    honest, bad, clean = _attack()
    updates = honest + bad
    harm = lambda agg: np.linalg.norm(agg - clean) / np.linalg.norm(clean)  # noqa: E731
    assert harm(aggregate("fedavg", updates)) > 1.5  # two boosted clients of twelve flip the step
    assert harm(aggregate(defence, updates, num_malicious=2, **kwargs)) < 0.5


# ---- Flower's strategy classes on real messages give the same result ------------------------------------
@pytest.mark.parametrize(
    "defence, kwargs",
    [
        ("fedavg", {}),
        ("median", {}),
        ("trimmed_mean", {"trim_fraction": 0.25}),
        ("krum", {}),
        ("krum", {"krum_select": 3}),
    ],
)
def test_flower_strategies_on_messages_match_aggregate(server_identity, defence, kwargs):
    n, f = len(UPDATES), 2
    strategy = flower_strategy(defence, num_malicious=f, min_train_nodes=n, min_available_nodes=n, **kwargs)
    zero = np.zeros(64)
    msgs = list(strategy.configure_train(1, ArrayRecord({"delta": Array(zero)}), ConfigRecord({}), NodeGrid(n)))
    replies = [
        Message(
            RecordDict({"arrays": ArrayRecord({"delta": Array(u)}), "metrics": MetricRecord({"num-examples": w})}),
            reply_to=m,
        )
        for m, u, w in zip(msgs, UPDATES, WEIGHTS, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = aggregate(defence, UPDATES, WEIGHTS, num_malicious=f, **kwargs)
    np.testing.assert_allclose(arrays["delta"].numpy(), expected, rtol=1e-12)


# ---- what runs under CKKS, and refusals ----------------------------------------------------------------
def test_only_fedavg_runs_on_ciphertexts_and_each_refusal_says_why():
    assert set(DEFENCES) == {"fedavg", "median", "trimmed_mean", "krum", "norm_bound"}
    table = ckks_summary()
    assert [d for d, row in table.items() if row["runs_on_ciphertexts"]] == ["fedavg"]
    ok, why = runs_on_ciphertexts("norm_bound")
    assert not ok and "cannot compute or check an encrypted update's norm" in why and "malicious" in why
    assert all(row["why"] and "\n" not in row["why"] for row in table.values())


@pytest.mark.parametrize(
    "defence, clients, kwargs, message",
    [
        ("bulyan", 10, {}, "federated.defence='bulyan' is not allowed: use one of"),
        ("krum", 6, {"num_malicious": 2}, "Krum needs >= 2f+3 updates, got 6"),
        ("median", 4, {"num_malicious": 2}, "a median needs a majority of 4 honest"),
        ("trimmed_mean", 10, {"num_malicious": 2, "trim_fraction": 0.1}, "cuts 1 of 10 updates per side"),
        ("norm_bound", 10, {}, "federated.defence.norm_bound=None is not allowed: must be > 0"),
    ],
)
def test_defences_that_cannot_tolerate_the_attackers_are_refused_in_one_line(defence, clients, kwargs, message):
    with pytest.raises(ConfigError) as info:
        check_defence(defence, clients, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_norm_bound_is_not_a_flower_strategy():
    with pytest.raises(ConfigError, match="norm_bound is a clip before FedAvg"):
        flower_strategy("norm_bound")

"""Partitions from flwr-datasets' real partitioners: coverage, seeding, label skew, shards, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from aisec_train.errors import ConfigError
from aisec_train.federated.partition import Partition, load_client_indices, partition_labels

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 balanced classes, sorted (the worst case for IID)
MIXED = np.random.default_rng(5).permutation(LABELS)  # the same labels in a shuffled order


def _disjoint_and_covering(indices, n: int) -> None:
    joined = np.concatenate(indices)
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize(
    "kind, extra",
    [("iid", {}), ("dirichlet", {"alpha": 0.5, "min_size": 10}), ("shards", {"shards_per_client": 2})],
)
def test_partitions_are_disjoint_cover_everything_and_are_seeded(kind, extra):
    part = partition_labels(MIXED, 10, kind, seed=3, **extra)
    _disjoint_and_covering(part.indices, MIXED.size)
    assert part.num_clients == 10 and part.dropped == 0
    # The histogram is of the caller's labels at the returned indices (the idx column survived sorting).
    for idx, hist in zip(part.indices, part.histograms, strict=True):
        assert np.array_equal(np.bincount(MIXED[idx], minlength=10), hist)
    again = partition_labels(MIXED, 10, kind, seed=3, **extra)
    assert all(np.array_equal(a, b) for a, b in zip(part.indices, again.indices, strict=True))
    other = partition_labels(MIXED, 10, kind, seed=4, **extra)
    assert not all(np.array_equal(a, b) for a, b in zip(part.indices, other.indices, strict=True))


def _skew(histograms: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    mix = histograms / histograms.sum(axis=1, keepdims=True)
    overall = histograms.sum(axis=0) / histograms.sum()
    return float(np.mean(0.5 * np.abs(mix - overall).sum(axis=1)))


def test_small_dirichlet_alpha_gives_skewed_histograms_and_iid_does_not():
    skew = {
        alpha: _skew(partition_labels(MIXED, 10, "dirichlet", alpha=alpha, min_size=5, seed=0).histograms)
        for alpha in (0.1, 1.0, 100.0)
    }
    iid = _skew(partition_labels(LABELS, 10, "iid", seed=0).histograms)  # sorted input: the shuffle matters
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5 and skew[100.0] < 0.15 and iid < 0.15


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_at_most_k_classes_per_client(k):
    part = partition_labels(MIXED, 20, "shards", shards_per_client=k, seed=1)  # 600 / (20 k): blocks within a class
    assert max(part.to_report()["classes_per_client"]) <= k
    assert set(part.sizes) == {600 // 20}


def test_many_clients_with_a_realistic_dirichlet_skew():
    labels = np.random.default_rng(0).integers(0, 10, 20_000)
    part = partition_labels(labels, 100, "dirichlet", alpha=0.5, min_size=10, seed=0)
    _disjoint_and_covering(part.indices, labels.size)
    assert min(part.sizes) >= 10 and part.histograms.shape == (100, 10)
    report = part.to_report()
    assert report["kind"] == "dirichlet" and report["alpha"] == 0.5 and len(report["label_histograms"]) == 100


def test_saved_partition_gives_each_client_its_own_indices(tmp_path):
    part = partition_labels(MIXED, 7, "dirichlet", alpha=1.0, min_size=5, seed=2)
    path = part.save(tmp_path / "partition.npz")
    for pid in range(7):
        assert np.array_equal(load_client_indices(path, pid), part.indices[pid])
    with pytest.raises(ConfigError, match=r"partition-id=7 is not allowed: must be in \[0, 7\)"):
        load_client_indices(path, 7)


def test_shards_that_do_not_divide_are_refused_or_drop_a_reported_remainder():
    with pytest.raises(ConfigError) as info:
        partition_labels(MIXED[:599], 10, "shards", shards_per_client=2, seed=0)
    assert "20 blocks do not divide 599 examples (19 left over)" in str(info.value)
    assert "\n" not in str(info.value)
    part = partition_labels(MIXED[:599], 10, "shards", shards_per_client=2, seed=0, drop_remainder=True)
    assert part.dropped == 19 and sum(part.sizes) == 580
    assert len(np.unique(np.concatenate(part.indices))) == 580


@pytest.mark.parametrize(
    "labels, clients, kind, extra, message",
    [
        (MIXED[:5], 6, "iid", {}, "federated.clients=6 is not allowed: must be in [1, 5] for 5 examples"),
        (MIXED, 0, "iid", {}, "federated.clients=0 is not allowed"),
        (MIXED, 10, "dirichlet", {"alpha": 0.0}, "federated.partition.alpha=0.0 is not allowed: must be > 0"),
        (MIXED, 10, "dirichlet", {"min_size": 61}, "10 clients x 61 exceeds 600 examples"),
        (MIXED, 10, "zipf", {}, "federated.partition.kind='zipf' is not allowed"),
        (MIXED, 100, "shards", {"shards_per_client": 7}, "700 shards exceed 600 examples"),
        (MIXED.astype(float), 4, "iid", {}, "labels=dtype('float64') is not allowed: integer class labels"),
        # Dirichlet at tiny alpha cannot give 100 clients 5 examples each: Flower gives up, in one line.
        (MIXED, 100, "dirichlet", {"alpha": 0.01, "min_size": 5, "self_balancing": False}, "federated.partition:"),
    ],
)
def test_impossible_settings_are_refused_in_one_line(labels, clients, kind, extra, message):
    with pytest.raises(ConfigError) as info:
        partition_labels(labels, clients, kind, seed=0, **extra)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_partition_made_elsewhere_gets_the_same_histograms_and_report():
    """The trainer reports the backdoor red team's partition through Partition.from_indices."""
    part = partition_labels(MIXED, 6, "dirichlet", alpha=0.5, min_size=5, seed=9)
    again = Partition.from_indices(MIXED, part.indices, "dirichlet", {"seed": 9, "source": "backdoor"})
    assert np.array_equal(again.histograms, part.histograms) and again.sizes == part.sizes
    assert again.to_report()["source"] == "backdoor" and again.to_report()["kind"] == "dirichlet"

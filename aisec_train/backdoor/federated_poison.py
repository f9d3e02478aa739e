"""The federated red team: the first ``K`` clients hold poisoned shards (``backdoor.malicious_clients=K``).

The client partition is the federated package's (:func:`aisec_train.federated.partition.client_partition`, with the
``federated.partition`` settings and ``train.seed``), computed here over the training split **after** the trusted
reserve is carved out, so the reserve never reaches a client. The poison stage keeps the partition it poisoned in
``BackdoorState.client_indices``; the federated trainer must give client ``i`` exactly ``client_indices[i]`` of
``data.train`` (re-partitioning the relabelled view could move rows between clients under label-skewed partitions).

How much of a malicious shard is poisoned: ``backdoor.rate`` of the shard, drawn among its rows whose label the
mapping changes, the rest of the shard staying clean. That is the literature's malicious-client recipe: Bagdasaryan
et al. 2020 ("How to backdoor federated learning") train the attacker's model on batches that mix backdoor inputs
with correctly labelled ones (20 of 64 in their image task, also DBA's setting, Xie et al. 2020) so that the
malicious update keeps the main task and stays close to benign ones; Sun et al. 2019 ("Can you really backdoor
federated learning?") likewise give attackers backdoor samples alongside clean data. A whole-shard poison would
make the attacker's update an obvious outlier and wreck its main-task accuracy.

>>> parts = client_partition(labels_of(data.train), cfg)
>>> poisoned, counts = poison_clients(data.train, parts, 2, rate=0.3, trigger=trigger, target_of=AllToOne(0), seed=0)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

from aisec_train.backdoor.badnets import Poisoned, TargetOf, Trigger, choose, eligible_rows, poison_rows
from aisec_train.data.views import labels_of

if TYPE_CHECKING:
    from aisec_train.config import Config

PARTITION_MODULE = "aisec_train.federated.partition"


def client_partition(labels: np.ndarray, cfg: Config) -> list[np.ndarray]:
    """Per-client index arrays over ``labels``: the federated package's one partition call, with every
    ``federated.partition`` setting and ``train.seed`` (imported lazily: it pulls in flwr-datasets, which only
    federated runs need)."""
    partition = importlib.import_module(PARTITION_MODULE)
    part = partition.client_partition(np.asarray(labels, dtype=np.int64), cfg.federated, cfg.train.seed)
    return [np.asarray(rows, dtype=np.int64) for rows in part.indices]


def poison_clients(
    train: Dataset,
    parts: list[np.ndarray],
    malicious: int,
    *,
    rate: float,
    trigger: Trigger,
    target_of: TargetOf,
    seed: int,
) -> tuple[Poisoned, list[int]]:
    """Poison ``round(rate * len(shard))`` eligible rows of each of the first ``malicious`` shards.

    Returns the poisoned view of the whole training split and the number of poisoned rows per malicious client.
    """
    labels = labels_of(train)
    rng = np.random.default_rng(seed)
    chosen, counts = [], []
    for shard in parts[:malicious]:
        rows = choose(shard[eligible_rows(labels[shard], target_of)], int(round(rate * len(shard))), rng)
        chosen.append(rows)
        counts.append(len(rows))
    rows = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return poison_rows(train, rows, trigger, target_of), counts

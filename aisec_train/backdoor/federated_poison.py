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

**Boosted (model-replacement) client** (``backdoor.boost=auto|<float>``, Bagdasaryan et al. 2020, section 4): a
malicious client scales its update ``X - G`` by ``gamma`` before sending it, so that after averaging with the
honest updates the global model moves (about) all the way to the attacker's model. With FedAvg over ``n`` clients
per round and a server learning rate ``eta``, ``gamma = n / eta`` replaces the model (``auto``: the federated
cohort over the server lr, 1 for plain FedAvg). ``1`` (the default) is the unboosted client above. The boost is
applied on the client after local training and before any client-side check, clip or encryption, so every
federated defence (the server's update-norm refusal, norm bound, median, trimmed mean, Krum) sees what a real
attacker would send.

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


def boost_factor(cfg: Config) -> float:
    """gamma of ``backdoor.boost``: ``auto`` = clients per round / server lr (Bagdasaryan et al.'s n / eta)."""
    boost = str(cfg.backdoor.boost)
    if boost != "auto":
        return float(boost)
    fed = cfg.federated
    dp_client = getattr(getattr(fed, "dp", None), "value", None) == "client"
    server_lr = fed.client_dp.server_lr if dp_client else 1.0  # plain FedAvg: the weighted mean is a step of 1
    return fed.cohort / server_lr


def boost(delta: np.ndarray, partition_id: int, cfg: Config) -> np.ndarray:
    """The update client ``partition_id`` sends: boosted when it is one of the malicious clients."""
    if partition_id >= cfg.backdoor.malicious_clients:
        return delta
    gamma = boost_factor(cfg)
    return delta if gamma == 1.0 else delta * gamma


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

"""Client partitions from flwr-datasets: IID, Dirichlet(alpha) label skew and pathological shards.

Only the labels are partitioned: they are wrapped in a Hugging Face ``datasets.Dataset`` with a ``label``
column and an ``idx`` column (the example's position in the caller's data), handed to Flower's
partitioners, and each client's ``idx`` values come back. The images stay wherever they are (a tensor, a
folder, a streamed Dataset); a client later loads its examples lazily by these indices. The ``idx`` column
matters: ShardPartitioner sorts the dataset by label and IID shards a shuffled copy, so row positions
inside a partitioner are not positions in the caller's data.

Example::

    part = partition_labels(train_labels, 100, "dirichlet", alpha=0.5, min_size=10, seed=0)
    part.indices[7]            # client 7's example indices (sorted int64)
    part.histograms[7]         # its label counts, columns = part.classes
    part.save(run_dir / "partition.npz")                     # once, by the job
    load_client_indices(run_dir / "partition.npz", 7)         # by client 7 only
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, ShardPartitioner

from aisec_train.errors import ConfigError, require
from aisec_train.store.files import safe_open_for_write

if TYPE_CHECKING:
    from aisec_train.federated.config import FederatedConfig

KINDS = ("iid", "dirichlet", "shards")
LABEL, INDEX = "label", "idx"


@dataclass(frozen=True)
class Partition:
    """Disjoint per-client index sets over a label array, with each client's label histogram."""

    kind: str
    indices: tuple[np.ndarray, ...]  # one sorted int64 array per client
    classes: np.ndarray  # the label values the histogram columns stand for
    histograms: np.ndarray  # (clients, classes) int64 counts
    params: dict[str, Any] = field(default_factory=dict)  # what produced it (seed, alpha, shards, ...)
    dropped: int = 0  # examples left out (only with shards and drop_remainder=True)

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> list[int]:
        return [len(i) for i in self.indices]

    def to_report(self) -> dict[str, Any]:
        """The report's ``federated.partition`` section: the recipe, sizes and every client's histogram."""
        return {
            "kind": self.kind,
            **self.params,
            "clients": self.num_clients,
            "classes": self.classes.tolist(),
            "sizes": self.sizes,
            "label_histograms": self.histograms.tolist(),
            "classes_per_client": (self.histograms > 0).sum(axis=1).tolist(),
            "dropped": self.dropped,
        }

    @classmethod
    def from_indices(
        cls, labels: np.ndarray, indices: Sequence[np.ndarray], kind: str, params: dict[str, Any] | None = None
    ) -> Partition:
        """A partition made elsewhere (e.g. the one the backdoor red team poisoned), with its histograms."""
        labels = np.asarray(labels)
        indices = tuple(np.sort(np.asarray(i, np.int64)) for i in indices)
        classes = np.unique(labels)
        return cls(kind, indices, classes, _histograms(labels, indices, classes), dict(params or {}))

    def save(self, path: Path) -> Path:
        """One ``.npz`` for the whole federation; a client reads its own slice with ``load_client_indices``."""
        path = Path(path)
        offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        flat = np.concatenate(self.indices) if self.indices else np.zeros(0, np.int64)
        meta = json.dumps({"kind": self.kind, "params": self.params, "dropped": self.dropped})
        with safe_open_for_write(path, root=path.parent) as fh:  # a file object: savez adds no .npz suffix
            np.savez(fh, indices=flat, offsets=offsets, classes=self.classes, histograms=self.histograms, meta=meta)
        return path


def _histograms(labels: np.ndarray, indices: Sequence[np.ndarray], classes: np.ndarray) -> np.ndarray:
    counts = [np.bincount(np.searchsorted(classes, labels[i]), minlength=classes.size) for i in indices]
    return np.stack(counts).astype(np.int64) if counts else np.zeros((0, classes.size), np.int64)


def load_client_indices(path: Path, partition_id: int) -> np.ndarray:
    """Client ``partition_id``'s example indices from a saved partition (no pickles: ``allow_pickle=False``)."""
    with np.load(Path(path), allow_pickle=False) as data:
        offsets = data["offsets"]
        clients = len(offsets) - 1
        require(0 <= partition_id < clients, "partition-id", partition_id, f"must be in [0, {clients})")
        return data["indices"][offsets[partition_id] : offsets[partition_id + 1]].copy()


def _check(labels: np.ndarray, num_clients: int, kind: str, alpha: float, min_size: int, shards: int) -> None:
    require(kind in KINDS, "federated.partition.kind", kind, f"use one of {list(KINDS)}")
    require(labels.ndim == 1 and labels.size > 0, "labels", labels.shape, "a non-empty 1-D array")
    require(np.issubdtype(labels.dtype, np.integer), "labels", labels.dtype, "integer class labels")
    n = labels.size
    require(1 <= num_clients <= n, "federated.clients", num_clients, f"must be in [1, {n}] for {n} examples")
    require(min_size >= 1, "federated.partition.min_size", min_size, "must be >= 1")
    # min_size is the Dirichlet draw's floor only: iid and shards ignore it (each client gets >= 1 example anyway),
    # so it must not refuse them (`federated.clients=200` on 1437 digits was refused by the Dirichlet default 10).
    ok = kind != "dirichlet" or num_clients * min_size <= n
    require(ok, "federated.partition.min_size", min_size, f"{num_clients} clients x {min_size} exceeds {n} examples")
    require(alpha > 0, "federated.partition.alpha", alpha, "must be > 0")
    require(shards >= 1, "federated.partition.shards_per_client", shards, "must be >= 1")


def _partitioner(kind: str, num_clients: int, seed: int, alpha: float, min_size: int, shards: int, balance: bool):
    if kind == "iid":
        return IidPartitioner(num_clients)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_clients, LABEL, alpha, min_partition_size=min_size, self_balancing=balance, shuffle=False, seed=seed
        )
    return ShardPartitioner(num_clients, LABEL, num_shards_per_partition=shards, shuffle=False, seed=seed)


def _client_indices(partitioner: Partitioner, num_clients: int) -> list[np.ndarray]:
    try:
        with warnings.catch_warnings():  # Dirichlet retries warn each time; the refusal below says it once
            warnings.simplefilter("ignore", UserWarning)
            return [np.sort(np.asarray(partitioner.load_partition(i)[:][INDEX], np.int64)) for i in range(num_clients)]
    except ValueError as err:  # Flower's refusals (e.g. Dirichlet min size unmet after 10 draws) -> one line
        raise ConfigError(f"federated.partition: {' '.join(str(err).split())}") from err


def partition_labels(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    *,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 1,
    self_balancing: bool = True,
    shards_per_client: int = 2,
    drop_remainder: bool = False,
) -> Partition:
    """Partition ``labels`` among ``num_clients`` with Flower's partitioners, seeded.

    - ``iid``: a seeded shuffle cut into near-equal contiguous shards (IidPartitioner).
    - ``dirichlet``: per class, shares drawn from Dirichlet(alpha) (DirichletPartitioner); small alpha =
      skewed label mixes. Redrawn (10 tries, Flower's limit) until every client has ``min_size``;
      ``self_balancing`` stops giving examples to a client already above the mean size (the reference
      code's rule; it keeps 100-client partitions usable at small alpha).
    - ``shards``: sort by label, cut into ``num_clients * shards_per_client`` equal blocks, give each client
      ``shards_per_client`` at random (ShardPartitioner, McMahan et al. 2017). A block holds one class unless it
      straddles a class boundary. The blocks must cover the data exactly: refused when they do not divide
      it, unless ``drop_remainder`` leaves a seeded random remainder out (reported as ``dropped``).
    """
    labels = np.asarray(labels)
    _check(labels, num_clients, kind, alpha, min_size, shards_per_client)
    keep = np.arange(labels.size)
    params: dict[str, Any] = {"seed": seed}
    if kind == "dirichlet":
        params.update(alpha=alpha, min_size=min_size, self_balancing=self_balancing)
    if kind == "shards":
        blocks = num_clients * shards_per_client
        ok = blocks <= labels.size
        require(
            ok,
            "federated.partition.shards_per_client",
            shards_per_client,
            f"{blocks} shards exceed {labels.size} examples",
        )
        remainder = labels.size % blocks
        require(
            remainder == 0 or drop_remainder,
            "federated.partition.shards_per_client",
            shards_per_client,
            f"{num_clients} clients x {shards_per_client} shards = {blocks} blocks do not divide {labels.size} "
            f"examples ({remainder} left over); pick sizes that divide it or set drop_remainder",
        )
        keep = np.sort(np.random.default_rng(seed).permutation(labels.size)[: labels.size - remainder])
        params.update(shards_per_client=shards_per_client, shard_size=labels.size // blocks)
    # Arrow format: Flower reads whole label columns with np.array(), which the numpy format does row by row.
    table = datasets.Dataset.from_dict({LABEL: labels[keep], INDEX: keep}).with_format("arrow")
    partitioner = _partitioner(kind, num_clients, seed, alpha, min_size, shards_per_client, self_balancing)
    partitioner.dataset = table.shuffle(seed=seed) if kind == "iid" else table
    indices = _client_indices(partitioner, num_clients)
    classes = np.unique(labels)
    histograms = _histograms(labels, indices, classes)
    return Partition(kind, tuple(indices), classes, histograms, params, labels.size - keep.size)


def client_partition(labels: np.ndarray, fed: FederatedConfig, seed: int) -> Partition:
    """The run's client partition from ``federated.partition``: the ONE call the federated trainer and the
    backdoor red team (``backdoor.malicious_clients``) both make, so client ``i`` of one is client ``i`` of the
    other. ``labels`` are the training split's (``aisec_train.data.views.labels_of``: no image is loaded).

    >>> part = client_partition(labels_of(data.train), cfg.federated, cfg.train.seed)
    """
    p = fed.partition
    return partition_labels(
        np.asarray(labels, dtype=np.int64),
        fed.clients,
        p.kind.value,
        seed=seed,
        alpha=p.alpha,
        min_size=p.min_size,
        self_balancing=p.self_balancing,
        shards_per_client=p.shards_per_client,
        drop_remainder=p.drop_remainder,
    )

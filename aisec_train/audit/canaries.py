"""Canaries for the one-run privacy audit: which samples, which coins, which labels, and lazy datasets around them.

Two kinds:

- ``mislabel`` (default): m training samples, each given a wrong label drawn uniformly from the other classes.
  A model that memorises its training set is confident in the wrong label only if the canary was included.
  Realistic (in-distribution inputs) and the strongest black-box canary for DP-SGD in the paper.
- ``noise``: m crafted uniform-noise images in [0, 1], each with a uniformly random label, added to the
  training set when included. Out-of-distribution inputs, so the clean data barely pulls them towards any label:
  a stronger signal on weak models, but they test memorisation of outliers, not of the data.

Selection, coins and labels come from three independent streams of one seed, so the coins cannot depend on
which canaries were chosen. Nothing is copied: the training set is a relabelling wrapper plus a
``torch.utils.data.Subset`` (mislabel) or a ``ConcatDataset`` with generated-on-read noise canaries (noise).

>>> indices, included = choose_canaries(1000, 200, seed=0)
>>> len(indices), included.dtype
(200, dtype('bool'))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from aisec_train.data.views import labels_of
from aisec_train.errors import require

KINDS = ("mislabel", "noise")


def _streams(seed: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]


def choose_canaries(n_train: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """m distinct canary indices in ``range(n_train)`` and one independent fair coin each (True = included)."""
    require(1 <= m <= n_train, "m", m, f"1 <= m <= the {n_train} training samples")
    select, coins, _ = _streams(seed)
    return select.choice(n_train, size=m, replace=False), coins.random(m) < 0.5


def wrong_labels(true_labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """A label drawn uniformly from the ``num_classes - 1`` classes other than each true label."""
    require(num_classes >= 2, "num_classes", num_classes, "must be >= 2 to mislabel")
    shift = _streams(seed)[2].integers(1, num_classes, size=len(true_labels))
    return (np.asarray(true_labels, dtype=np.int64) + shift) % num_classes


def noise_image(index: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Canary ``index``'s uniform-noise image: generated on read, the same every time."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    return torch.rand(shape, generator=generator)


@dataclass(frozen=True)
class CanaryPlan:
    kind: str
    indices: np.ndarray  # mislabel: positions in the training dataset; noise: canary ids 0..m-1
    included: np.ndarray  # bool, one fair coin per canary
    labels: np.ndarray  # the label each canary is trained (and scored) with
    shape: tuple[int, ...]  # image shape (noise canaries)
    seed: int


def _label(y) -> int:
    return int(y.item()) if isinstance(y, torch.Tensor) else int(y)


def count_classes(dataset: Dataset) -> int:
    """``len(dataset.classes)`` when the dataset says (torchvision), else 1 + the largest label (one pass)."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    return 1 + max(_label(dataset[i][1]) for i in range(len(dataset)))


def plan_canaries(dataset: Dataset, *, m: int, seed: int, kind: str = "mislabel", num_classes: int | None = None):
    """Choose the canaries, their coins and their labels for ``dataset`` (reads only the m canaries' samples)."""
    require(kind in KINDS, "audit.privacy_audit.canary_kind", kind, f"one of {list(KINDS)}")
    num_classes = num_classes or count_classes(dataset)
    shape = tuple(dataset[0][0].shape)
    if kind == "mislabel":
        indices, included = choose_canaries(len(dataset), m, seed)
        labels = wrong_labels(np.array([_label(dataset[int(i)][1]) for i in indices]), num_classes, seed)
    else:
        require(m >= 1, "m", m, "must be >= 1")
        indices, included = np.arange(m), _streams(seed)[1].random(m) < 0.5
        labels = _streams(seed)[2].integers(0, num_classes, size=m)
    return CanaryPlan(kind, indices, included, labels, shape, seed)


class Relabelled(Dataset):
    """``base`` with some labels replaced (``{index: label}``); every label comes back as a Python int.

    ``labels`` (all of them, int64) lets :func:`aisec_train.data.views.labels_of` read them without images.
    """

    def __init__(self, base: Dataset, overrides: dict[int, int]):
        self.base, self.overrides = base, overrides
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, self.overrides.get(int(i), _label(y))

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            labels = labels_of(self.base).copy()
            for i, y in self.overrides.items():
                labels[i] = y
            self._labels = labels
        return self._labels


class NoiseCanaries(Dataset):
    """The noise canaries ``ids`` with their labels, images generated on read."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, shape: tuple[int, ...], seed: int):
        self.ids, self.labels, self.shape, self.seed = ids, labels, shape, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int):
        return noise_image(int(self.ids[j]), self.shape, self.seed), int(self.labels[j])


def canary_training_set(dataset: Dataset, plan: CanaryPlan) -> Dataset:
    """What the canary model trains on: the data with included canaries (relabelled or added), excluded ones absent."""
    inc = plan.included
    if plan.kind == "noise":
        # Relabelled with no changes: every label an int, so batches mixing data and canaries collate.
        added = NoiseCanaries(plan.indices[inc], plan.labels[inc], plan.shape, plan.seed)
        return ConcatDataset([Relabelled(dataset, {}), added])
    relabelled = Relabelled(dataset, {int(i): int(y) for i, y in zip(plan.indices[inc], plan.labels[inc], strict=True)})
    excluded = np.zeros(len(dataset), dtype=bool)
    excluded[plan.indices[~inc]] = True
    return Subset(relabelled, np.flatnonzero(~excluded).tolist())


def canary_eval_set(dataset: Dataset, plan: CanaryPlan) -> Dataset:
    """All m canaries, in plan order, with the labels they were (or would have been) trained with."""
    if plan.kind == "noise":
        return NoiseCanaries(plan.indices, plan.labels, plan.shape, plan.seed)
    relabelled = Relabelled(dataset, {int(i): int(y) for i, y in zip(plan.indices, plan.labels, strict=True)})
    return Subset(relabelled, plan.indices.tolist())

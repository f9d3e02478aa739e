"""BadNets (Gu et al. 2017): stamp a trigger patch on chosen training rows and relabel them, as a view.

Nothing is copied: :class:`PoisonedView` stamps the trigger on the stored [0, 1] image and swaps the label when
one of the chosen rows is read, so poisoning works at any data size and augmentation (``DataBundle.training_view``)
applies after the stamp, as in the attack. Triggered test inputs are views too.

>>> trigger = Trigger(size=3, position="bottom_right", value=1.0)
>>> poisoned = poison(train, rate=0.1, trigger=trigger, target_of=AllToOne(0), seed=0)
>>> data.train = poisoned.view   # what training reads; poisoned.indices stays with the red team (BackdoorState)

The view must know its own rows to stamp them, but the pipeline hands training nothing else: the true poisoned
indices, used to score the detectors, live in :class:`Poisoned` on ``run.backdoor``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from aisec_train.data.manifest import sha256_array, sha256_json
from aisec_train.data.views import Relabeled, labels_of, subset


@dataclass(frozen=True)
class Trigger:
    size: int = 3
    position: str = "bottom_right"  # bottom_right | bottom_left | top_right | top_left
    value: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` (an image (C, H, W) or a batch (N, C, H, W)) with the patch on every channel."""
        h, w = x.shape[-2:]
        s = min(self.size, h, w)
        rows = slice(h - s, h) if self.position.startswith("bottom") else slice(0, s)
        cols = slice(w - s, w) if self.position.endswith("right") else slice(0, s)
        out = x.clone()
        out[..., rows, cols] = self.value
        return out


# Label mappings as small classes, not lambdas: the state travels to federated clients, so it must pickle.
# Each works on an int, a numpy array or a tensor of labels.
@dataclass(frozen=True)
class AllToOne:
    target: int

    def __call__(self, y):
        return y * 0 + self.target


@dataclass(frozen=True)
class AllToAll:
    num_classes: int

    def __call__(self, y):
        return (y + 1) % self.num_classes


TargetOf = AllToOne | AllToAll


def all_to_one(target: int) -> AllToOne:
    return AllToOne(target)


def all_to_all(num_classes: int) -> AllToAll:
    return AllToAll(num_classes)


class PoisonedView(Relabeled):
    """``base`` with the trigger stamped on the relabelled rows, applied when a row is read."""

    def __init__(self, base: Dataset, new_labels: dict[int, int], trigger: Trigger):
        super().__init__(base, new_labels)
        self.trigger = trigger

    def __getitem__(self, index: int):
        x, y = self.base[index]
        label = self.new_labels.get(int(index))
        if label is None:
            return x, y
        # The base's own label type (int or 0-d tensor): a batch mixing both would not collate.
        return self.trigger.apply(x), torch.as_tensor(label, dtype=y.dtype) if isinstance(y, torch.Tensor) else label


@dataclass
class Poisoned:
    view: PoisonedView  # the training split as the trainer sees it
    indices: np.ndarray  # rows of ``view`` that carry the trigger (sorted int64)
    new_labels: np.ndarray  # the attacker's label of each of those rows
    true_labels: np.ndarray  # labels before relabelling, for every row


def eligible_rows(labels: np.ndarray, target_of: TargetOf) -> np.ndarray:
    """Rows whose label the mapping changes (for all-to-one: not already the target)."""
    return np.flatnonzero(target_of(labels) != labels)


def choose(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, size=min(count, len(rows)), replace=False)).astype(np.int64)


def poison_rows(base: Dataset, rows: np.ndarray, trigger: Trigger, target_of: TargetOf) -> Poisoned:
    """The view of ``base`` with exactly ``rows`` stamped and relabelled."""
    labels = labels_of(base)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    new = np.asarray(target_of(labels[rows]), dtype=np.int64)
    view = PoisonedView(base, dict(zip(rows.tolist(), new.tolist(), strict=True)), trigger)
    return Poisoned(view, rows, new, labels.copy())


def poison(base: Dataset, *, rate: float, trigger: Trigger, target_of: TargetOf, seed: int) -> Poisoned:
    """Poison ``round(rate * N)`` rows drawn among those whose label the mapping actually changes.

    Drawing only rows whose label changes makes every poisoned row a real attack sample, so ``rate`` is the
    attacker's effective budget and recall is scored on samples a detector could in principle tell apart.
    """
    labels = labels_of(base)
    rows = choose(eligible_rows(labels, target_of), int(round(rate * len(labels))), np.random.default_rng(seed))
    return poison_rows(base, rows, trigger, target_of)


class Triggered(Dataset):
    """Every image of ``base`` with the trigger stamped, labelled by ``labels`` (attacker's or true)."""

    def __init__(self, base: Dataset, trigger: Trigger, labels: np.ndarray):
        self.base, self.trigger, self.labels = base, trigger, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x, _ = self.base[index]
        return self.trigger.apply(x), int(self.labels[index])


def triggered(test: Dataset, trigger: Trigger, target_of: TargetOf) -> tuple[Triggered, Triggered]:
    """Test inputs for the attack metrics, from rows whose label the mapping changes.

    Returns (with attacker labels: ASR is accuracy on it; with true labels: RA is accuracy on it).
    """
    labels = labels_of(test)
    keep = eligible_rows(labels, target_of)
    base = subset(test, keep)
    return Triggered(base, trigger, target_of(labels[keep])), Triggered(base, trigger, labels[keep])


def fingerprint(poisoned: Poisoned, trigger: Trigger, target_of: TargetOf) -> dict[str, str]:
    """Hashes that tie the lineage entry to exactly these rows, labels and trigger (the images are the
    manifest's; the view adds nothing else)."""
    return {
        "indices_sha256": sha256_array(poisoned.indices.astype(np.int64)),
        "labels_sha256": sha256_array(poisoned.new_labels.astype(np.int64)),
        "trigger_sha256": sha256_json({"trigger": asdict(trigger), type(target_of).__name__: asdict(target_of)}),
    }

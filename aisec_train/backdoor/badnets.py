"""BadNets (Gu et al. 2017): stamp a trigger patch on a fraction of the training split and relabel it.

>>> trigger = Trigger(size=2, position="bottom_right", value=1.0)
>>> poisoned = poison(split, rate=0.1, trigger=trigger, target_of=all_to_one(0), seed=0)
>>> poisoned.split  # what training sees; poisoned.indices is kept for scoring detectors only

Only the training split is poisoned. The poisoned indices never reach the training loop: it receives a
plain :class:`Split` whose rows look like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from aisec_train.data.dataset import Split, sha256_array

TargetOf = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Trigger:
    size: int = 3
    position: str = "bottom_right"  # bottom_right | bottom_left | top_right | top_left
    value: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of the (N, C, H, W) batch ``x`` with the patch stamped on every image and channel."""
        h, w = x.shape[-2:]
        s = min(self.size, h, w)
        rows = slice(h - s, h) if self.position.startswith("bottom") else slice(0, s)
        cols = slice(w - s, w) if self.position.endswith("right") else slice(0, s)
        out = x.clone()
        out[..., rows, cols] = self.value
        return out


def all_to_one(target: int) -> TargetOf:
    return lambda y: torch.full_like(y, target)


def all_to_all(num_classes: int) -> TargetOf:
    return lambda y: (y + 1) % num_classes


@dataclass
class Poisoned:
    split: Split  # the training split as the trainer sees it
    indices: np.ndarray  # rows of ``split`` that carry the trigger (sorted)
    true_labels: torch.Tensor  # labels before relabelling, for every row


def poison(split: Split, *, rate: float, trigger: Trigger, target_of: TargetOf, seed: int) -> Poisoned:
    """Poison ``round(rate * N)`` rows drawn among those whose label the mapping actually changes.

    Drawing only rows whose label changes (for all-to-one: not already the target) makes every poisoned
    row a real attack sample, so ``rate`` is the attacker's effective budget and recall is scored on
    samples a detector could in principle tell apart.
    """
    n = len(split)
    eligible = np.flatnonzero((target_of(split.y) != split.y).numpy())
    count = min(len(eligible), int(round(rate * n)))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(eligible, size=count, replace=False))
    x, y = split.x.clone(), split.y.clone()
    sel = torch.from_numpy(idx)
    x[sel] = trigger.apply(split.x[sel])
    y[sel] = target_of(split.y[sel])
    return Poisoned(Split(x, y), idx, split.y.clone())


def triggered(split: Split, trigger: Trigger, target_of: TargetOf) -> tuple[Split, Split]:
    """Test inputs for the attack metrics, from rows whose label the mapping changes.

    Returns (with attacker labels: ASR is accuracy on it; with true labels: RA is accuracy on it).
    """
    keep = (target_of(split.y) != split.y).nonzero().flatten()
    x = trigger.apply(split.x[keep])
    y_true = split.y[keep]
    return Split(x, target_of(y_true)), Split(x, y_true)


def fingerprint(poisoned: Poisoned) -> dict[str, str]:
    """Hashes that tie the lineage entry to exactly these poisoned arrays and indices."""
    return {
        "x_sha256": sha256_array(poisoned.split.x.numpy()),
        "y_sha256": sha256_array(poisoned.split.y.numpy()),
        "indices_sha256": sha256_array(poisoned.indices.astype(np.int64)),
    }

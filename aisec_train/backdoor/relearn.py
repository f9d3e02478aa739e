"""Relearning without the rows the repair clears: a fresh model trained on what is left, released only if it did
not learn the backdoor again (docs/backdoor.md, "Relearning without the cleared rows").

Fine-Pruning's fine-tuning re-teaches from 300 trusted rows and the guarded teacher's soft labels, and on the
natural set its models ended at 0.73-0.79 clean accuracy whatever the trained model had (most of the loss in the
target's own recall, the class the guarded teacher leaves out). But once the repair has named the target from the
training inputs (``fine_pruning.named_target``: a central run without DP, so the training split and its labels are
in the process) and the repaired model no longer follows the trigger, the labels say which rows to drop:

0. **only for an all-to-one mapping**: the rule clears one class, the one every poisoned row is relabelled to. With
   ``backdoor.mapping=all_to_all`` the poison is spread over every label, and on digits the retrained model learnt
   the trigger again (ASR 0.80 against the repair's 0.01) while no class gained a share of the inputs for the guard
   below to see; nothing is relearnt there (the mapping is the red team's setting: a defender who cannot assume an
   all-to-one backdoor should set ``backdoor.relearn=false``);
1. **clear**: every row labelled the named target that the repaired model does not send there. All-to-one poison
   relabels every poisoned row to the target, and a repaired model sends a triggered input to its true class; the
   clean target rows it gets wrong go too (on the natural set 118-120 of 120 poisoned rows and 40-50 clean ones);
2. **retrain** a fresh model from the run's factory, the run's own training config and seed, on the other rows plus
   the trusted ones (clean, and no longer needed to judge a repair), half of every batch read blended with fresh
   noise keys up to ``backdoor.relearn_blend`` (:class:`~aisec_train.train.objectives.BlendedInputs`: a model that
   never saw a poisoned row still sent 9-17% of noise-blended natural images to one class);
3. **again** (``backdoor.relearn_rounds``, default 2): an earlier round's retrain (without the trusted rows,
   which the repair fine-tunes on: a model that already fits them is barely moved by it) is repaired as the
   trained one was, and the rows labelled the same target that this repaired copy sends elsewhere are cleared
   too; a fresh model is trained on what is left. The few poisoned rows the first repair kept (it still half
   followed the trigger) teach the retrain a weaker backdoor, which the same repair removes more completely
   (docs/backdoor.md, "A second round of clearing");
4. **guard**: the last retrain is released only if it sends no class more of the training inputs than the
   repaired model does, by more than ``backdoor.relearn_max_shift``. A retrain that kept the poison (a wrong
   target named) learns the trigger again and sends those rows back to the target: +0.07 to +0.11 of the inputs
   at ``backdoor.rate=0.1``, where the 71 correct clearings of the matrices moved no class by more than 0.036;
   and only if its weights are finite. Otherwise the repaired model stays the released one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from aisec_train.data.views import make_loader


@dataclass
class Relearned:
    """What relearning did, for the report (``backdoor.fine_pruning.relearn``)."""

    target: int  # the class the repair named (the one whose rows were cleared)
    cleared: int  # training rows labelled the target that the repaired model sends elsewhere
    trained_on: int  # rows the fresh model trained on: the rest of the split plus the trusted rows
    shift: list[float] = field(default_factory=list)  # per class: retrained share of the inputs - repaired share
    released: bool = False  # False: the guard kept the repaired model
    model: nn.Module | None = None  # the retrained model (released or not)
    cleared_by_round: list[int] = field(default_factory=list)  # rows cleared so far, after each round

    def describe(self, max_shift: float, blend: float) -> dict:
        return {
            "target": self.target,
            "cleared_rows": self.cleared,
            "cleared_by_round": self.cleared_by_round,
            "trained_on": self.trained_on,
            "blend": blend,
            "shift": self.shift,
            "max_shift": max_shift,
            "released": "relearned" if self.released else "repaired",
        }


def predictions(model: nn.Module, rows: Dataset, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The model's class for every row of ``rows`` and the row's label, streamed (nothing holds the split)."""
    was = model.training
    model.eval()
    sent, labels = [], []
    with torch.no_grad():
        for x, y in make_loader(rows, batch_size=512, device=device):
            sent.append(model(x.to(device)).argmax(1).cpu().numpy())
            labels.append(np.asarray(y))
    model.train(was)
    return np.concatenate(sent), np.concatenate(labels)


def cleared(sent: np.ndarray, labels: np.ndarray, target: int) -> np.ndarray:
    """The rows labelled ``target`` that the repaired model (``sent``: its classes) sends to another class."""
    return (labels == target) & (sent != target)


def share_shift(sent_new: np.ndarray, sent_repaired: np.ndarray, classes: int) -> list[float]:
    """Per class: the share of the rows the new model sends there, less the repaired model's share."""
    new = np.bincount(sent_new, minlength=classes) / len(sent_new)
    old = np.bincount(sent_repaired, minlength=classes) / len(sent_repaired)
    return [round(float(v), 4) for v in new - old]


def finite(model: nn.Module) -> bool:
    """Every floating-point weight and buffer finite: a diverged retrain is never released."""
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


class IntLabelled(Dataset):
    """``base`` with every label an ``int``: the training split's rows and the trusted rows (a file's ``Sample``
    holds tensor labels) must collate into one batch."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return x, int(y)


def training_rows(rows: Dataset, keep: np.ndarray, trusted: Dataset | None) -> Dataset:
    """The rows a relearned model trains on: ``rows`` where ``keep``, then the trusted rows (``None``: an earlier
    round's retrain, which the repair will fine-tune on the trusted rows, so it must not have fit them already)."""
    from aisec_train.data.views import subset

    kept = IntLabelled(subset(rows, np.flatnonzero(keep)))
    return kept if trusted is None else ConcatDataset([kept, IntLabelled(trusted)])

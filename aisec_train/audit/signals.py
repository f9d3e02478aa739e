"""What every membership attack scores from: the audited model's and each OUT reference model's logits on the
targets and on population samples, and who trained on what (:class:`MembershipSignals`).

The loss attack and offline LiRA read the targets only. RMIA (:mod:`aisec_train.audit.rmia`) also reads the
population samples z: how likely the audited model finds a target, relative to the reference models, is compared
with the same ratio on z. Logits are kept whole (float32) so an attack may pick its own temperature.

>>> probs = signals.true_label_probabilities()  # doctest: +SKIP
>>> sorted(probs)  # the keyword arguments of rmia.rmia_scores  # doctest: +SKIP
['ref_x', 'ref_z', 'ref_z_in', 'target_x', 'target_z']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from aisec_train.data.views import make_loader
from aisec_train.errors import require


@dataclass
class MembershipSignals:
    labels: np.ndarray  # (T,) 1 = member (from the training split), 0 = non-member (from the held-out split)
    target_y: torch.Tensor  # (T,) the targets' class labels
    target_logits: torch.Tensor  # (T, C) the audited model on the targets
    reference_logits: torch.Tensor  # (R, T, C) each OUT reference model on the targets (no target is in any)
    population_y: torch.Tensor  # (Z,) the population samples' class labels (Z = 0 without reference models)
    population_logits: torch.Tensor  # (Z, C) the audited model on the population samples
    population_reference_logits: torch.Tensor  # (R, Z, C)
    population_in: np.ndarray  # (R, Z) bool: reference model r trained on population sample z
    population_member: np.ndarray  # (Z,) bool: z is in the audited model's training split

    @property
    def references(self) -> int:
        return int(self.reference_logits.shape[0])

    def true_label_probabilities(self, temperature: float = 1.0) -> dict[str, np.ndarray]:
        """softmax(logits / temperature)[label] in float64, named as :func:`rmia.rmia_scores`'s arguments."""
        require(temperature > 0, "temperature", temperature, "must be > 0")

        def prob(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
            p = torch.softmax(logits.double() / temperature, dim=-1)
            return p.gather(-1, y.long().expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1).numpy()

        return {
            "target_x": prob(self.target_logits, self.target_y),
            "ref_x": prob(self.reference_logits, self.target_y),
            "target_z": prob(self.population_logits, self.population_y),
            "ref_z": prob(self.population_reference_logits, self.population_y),
            "ref_z_in": self.population_in,
        }


@torch.no_grad()
def logits_on(
    models: Sequence[nn.Module], dataset: Dataset, device: torch.device, batch_size: int = 512, workers: int = 0
) -> list[torch.Tensor]:
    """Each model's float32 logits on ``dataset``, on the CPU, in one streamed pass (each batch read once)."""
    for model in models:
        model.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    for x, _ in make_loader(dataset, batch_size=batch_size, workers=workers, device=device):
        x = x.to(device, non_blocking=True)
        for out, model in zip(outs, models, strict=True):
            out.append(model(x).float().cpu())
    return [torch.cat(out) for out in outs]


def stack(logits: list[torch.Tensor], rows: int, classes: int) -> torch.Tensor:
    """(R, rows, classes); an empty (0, rows, classes) when there are no reference models."""
    return torch.stack(logits) if logits else torch.empty(0, rows, classes)

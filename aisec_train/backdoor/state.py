"""What the poison stage hands the train and defend stages, kept on ``run.backdoor`` and never given to training.

The federated trainer reads it from ``job.extras["backdoor"]``: client ``i`` must train on exactly
``client_indices[i]`` of ``data.train`` (the partition the red team poisoned); ``malicious_clients`` and
``poisoned_per_client`` say who holds poison, for its report. The defend stage adds the detection results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from aisec_train.backdoor import badnets
from aisec_train.backdoor.detect import Detection
from aisec_train.backdoor.layers import FeatureLayer


@dataclass
class BackdoorState:
    trigger: Any  # backdoor/attacks.py: badnets.Trigger, BlendTrigger or WarpTrigger (each has apply(x))
    target_of: badnets.TargetOf
    poisoned: badnets.Poisoned  # the true poisoned indices, for scoring the detectors and relearning's clearing only
    trusted: Dataset  # the defender's clean data (backdoor/trusted.py): a Subset reserve or a Sample from a file
    from_file: bool  # True: backdoor.trusted_path; False: a reserve carved from the training split
    layer: FeatureLayer  # the module detection and Fine-Pruning read (backdoor/layers.py)
    # Federated red team (backdoor.malicious_clients=K): the partition poisoned, and who holds poison.
    client_indices: tuple[np.ndarray, ...] | None = None
    malicious_clients: tuple[int, ...] = ()
    poisoned_per_client: tuple[int, ...] = ()
    # Filled by the defend stage: every detector's flags, by method name.
    detections: dict[str, Detection] = field(default_factory=dict)

    def client_rows(self, client: int) -> np.ndarray:
        """Client ``client``'s rows of ``data.train`` (federated red team only)."""
        if self.client_indices is None:
            raise ValueError("this run has no federated red team: no client partition was poisoned")
        return self.client_indices[client]

"""What the poison stage hands the defence stage, kept on the run and never given to training."""

from __future__ import annotations

from dataclasses import dataclass

from aisec_train.backdoor import badnets
from aisec_train.data.dataset import Split


@dataclass
class BackdoorState:
    trigger: badnets.Trigger
    target_of: badnets.TargetOf
    poisoned: badnets.Poisoned  # the true poisoned indices, for scoring the detectors only
    trusted: Split  # the defender's clean data (backdoor/trusted.py)
    from_file: bool  # True: backdoor.trusted_path; False: a reserve carved from the training split

"""An exponential moving average of the weights, the model a run reports.

Averaging DP-SGD iterates is post-processing, so it costs no privacy, and it smooths out the injected
noise (De et al. 2022). On digits at epsilon 3 it lifted the worst of four seeds from 0.886 to 0.903, and
decay 0.97 rather than 0.9 the mean of three seeds from 0.911 to 0.917 (docs/privacy.md). Written here
rather than with ``torch.optim.swa_utils.AveragedModel``, which deep-copies the module and with it the
Opacus hooks attached during training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach(), 1.0 - self.decay)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights (for evaluation), then restore the training weights."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({**model.state_dict(), **self.shadow})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)

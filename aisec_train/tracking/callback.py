"""The training loop's hook into tracking: per optimizer step the loss, clip fraction and learning rate, and epsilon
spent at each epoch's last step (``logger.epsilon_every_n_steps=N``: every N steps); per epoch the history row
(test accuracy, epsilon, seconds)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from aisec_train.train.callbacks import Callback

if TYPE_CHECKING:
    from aisec_train.tracking.base import Tracker
    from aisec_train.train.loop import Loop


class StepLogger(Callback):
    """Feeds ``sink.log_metrics(values, step, axis)``: a :class:`Tracker`, or a :class:`StepBuffer` a data-parallel
    rank 0 hands back to the job's process (tracker clients do not cross processes)."""

    def __init__(self, sink: Tracker | StepBuffer, every_n_steps: int = 1, epsilon_every_n_steps: int = 0):
        self.sink, self.every, self.epsilon_every = sink, every_n_steps, epsilon_every_n_steps

    def after_step(self, loop: Loop) -> None:
        if loop.rank != 0:
            return
        values: dict[str, Any] = {}
        if loop.steps % self.every == 0:
            values["lr"] = loop.base_optimizer.param_groups[0]["lr"]
            if loop.last_loss is not None:
                values["loss"] = loop.last_loss
            fraction = clip_fraction(loop)
            if fraction is not None:
                values["clip_fraction"] = fraction
        # An exact epsilon is an accountant call (70-80 ms under PRV): every step only when asked for
        if loop.ledger is not None and self.epsilon_every and loop.steps % self.epsilon_every == 0:
            values["epsilon"] = loop.ledger.epsilon()
        if values:
            self.sink.log_metrics(values, loop.steps, "step")

    def on_epoch_end(self, loop: Loop, row: dict[str, Any]) -> None:
        if loop.rank != 0:
            return
        if not self.epsilon_every and "epsilon" in row:  # the row's own figure, at the epoch's last step
            self.sink.log_metrics({"epsilon": row["epsilon"]}, loop.steps, "step")
        self.sink.log_metrics({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]), "epoch")


def clip_fraction(loop: Loop) -> float | None:
    """The share of the last physical batch's kept records whose per-sample gradient norm was clipped (bk and ghost
    modes keep the norms; Opacus' hooks mode does not: None)."""
    if not loop.private:
        return None
    try:
        norms = loop.model.per_sample_gradient_norms
    except (AttributeError, ValueError):
        return None
    if not isinstance(norms, torch.Tensor):
        return None
    # Over the records the step used: one whose norm is not finite was dropped from it (clip factor 0), and
    # counting it (as unclipped: NaN > C is false) moved the fraction at exactly the steps whose secret Poisson
    # draws picked it. How many were dropped is logged nowhere (an un-noised count).
    norms = norms[torch.isfinite(norms)]
    if norms.numel() == 0:
        return None
    return float((norms > loop.privacy.max_grad_norm).float().mean())


class StepBuffer:
    """A picklable sink: records kept in order, replayed into the tracker by the job's process."""

    def __init__(self) -> None:
        self.records: list[tuple[dict[str, float], int, str]] = []

    def log_metrics(self, values: dict[str, Any], step: int, axis: str) -> None:
        self.records.append((dict(values), step, axis))

    def replay(self, tracker: Tracker) -> None:
        for values, step, axis in self.records:
            tracker.log_metrics(values, step, axis)


def step_loggers(job: Any) -> list[Callback]:
    """The loop callbacks a trainer adds for the run's tracker (none when no logger is on)."""
    tracker = job.extras.get("tracker")
    return [StepLogger(tracker, job.cfg.logger.every_n_steps, job.cfg.logger.epsilon_every_n_steps)] if tracker else []

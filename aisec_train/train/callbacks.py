"""The training loop's extras as small callbacks: budget stop, weight averaging, LR schedule, numeric health,
checkpointing. The loop calls, in order of the list it is given:

    on_train_start(loop) -> [before_step(loop) -> step -> after_step(loop)]* -> on_epoch_end(loop, row) ...
    -> on_train_end(loop)

An exception that ends training part-way (Ctrl-C, SIGTERM, a non-finite stop, a bug) calls
``on_train_stopped(loop)`` instead of ``on_train_end``, then passes. ``before_step`` returning True stops
training before that step (nothing of it is released). A callback with
``state_dict`` / ``load_state_dict`` has its state saved in every checkpoint under its ``key``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from aisec_train.errors import Refusal
from aisec_train.train.averaging import WeightAverage


class LoopState(Protocol):
    """What a callback reads of the loop (train/loop.py's ``Loop`` has it). Named here, not imported, so the loop
    and its callbacks do not import each other (tests/test_import_graph.py)."""

    plain: nn.Module  # the model being trained, unwrapped
    base_optimizer: torch.optim.Optimizer
    ledger: Any  # privacy/ledger.py's PrivacyLedger under DP, else None
    stopped_by_budget: bool
    last_loss: float | None  # as logged: under DP over the step's finite rows only (train/loop.py, RowLosses)
    batch_loss_finite: bool  # the objective's own loss of the last step was finite
    private: bool  # DP-SGD: the loss is a statistic of the private batch (FiniteGuard)
    epoch: int
    steps: int

    def payload(self) -> dict[str, Any]: ...


class NonFiniteError(Refusal, RuntimeError):
    """Training produced a non-finite loss or weights; the last good checkpoint is kept."""


class Callback:
    key = ""

    def on_train_start(self, loop: LoopState) -> None: ...

    def before_step(self, loop: LoopState) -> bool:
        return False

    def after_step(self, loop: LoopState) -> None: ...

    def on_epoch_end(self, loop: LoopState, row: dict[str, Any]) -> None: ...

    def on_train_end(self, loop: LoopState) -> None: ...

    def on_train_stopped(self, loop: LoopState) -> str | None:
        """Training ended by an exception part-way; what this callback did about it, in a few words (or None)."""
        return None

    def evaluation(self, model: nn.Module):
        """A context in which the model is evaluated (weight averaging swaps its weights in)."""
        return nullcontext()


class BudgetStop(Callback):
    """Stop before the step that would take the ledger past the step limit the privacy budget allows."""

    def __init__(self, max_steps: float):
        self.max_steps = max_steps

    def before_step(self, loop: LoopState) -> bool:
        if loop.ledger is not None and loop.ledger.steps >= self.max_steps:
            loop.stopped_by_budget = True
        return loop.stopped_by_budget


class WeightAveraging(Callback):
    """An exponential moving average of the weights (free post-processing of DP iterates): the run's model."""

    key = "ema"

    def __init__(self, decay: float):
        self.decay, self.average = decay, None

    def on_train_start(self, loop: LoopState) -> None:
        self.average = self.average or WeightAverage(loop.plain, self.decay)

    def after_step(self, loop: LoopState) -> None:
        self.average.update(loop.plain)

    def evaluation(self, model: nn.Module):
        return self.average.applied(model)

    def on_train_end(self, loop: LoopState) -> None:
        self.average.copy_to(loop.plain)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        self.average = WeightAverage(model, self.decay)
        self.average.load_state_dict(state)


class SchedulerStep(Callback):
    """Step an LR scheduler once per optimizer step."""

    key = "scheduler"

    def __init__(self, build: Callable[[torch.optim.Optimizer], Any]):
        self.build, self.scheduler, self.pending = build, None, None

    def on_train_start(self, loop: LoopState) -> None:
        self.scheduler = self.build(loop.base_optimizer)
        if self.pending is not None:
            self.scheduler.load_state_dict(self.pending)

    def after_step(self, loop: LoopState) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.pending = state


class FiniteGuard(Callback):
    """Stop at once on a non-finite loss, and never let non-finite weights reach a checkpoint."""

    def after_step(self, loop: LoopState) -> None:
        if loop.private:
            if loop.batch_loss_finite:
                return
            # Under DP the loss is a statistic of the private batch that no noise covers. A record whose forward
            # overflows is dropped from its step (clip factor 0, its captured rows zeroed: train/bk.py), so the model
            # stays finite, and stopping on the loss told when the secret draws first picked that record. The
            # weights are the noised step's output, so checking them releases nothing more.
            self._check_weights(loop, f"at step {loop.steps}")
            return
        if loop.last_loss is None or math.isfinite(loop.last_loss):
            return
        raise NonFiniteError(
            f"training stopped: the loss became {loop.last_loss} at epoch {loop.epoch + 1} (step {loop.steps}); "
            "the last good checkpoint is kept. Lower train.lr or check the data"
        )

    def on_epoch_end(self, loop: LoopState, row: dict[str, Any]) -> None:
        self._check_weights(loop, f"in epoch {loop.epoch + 1}")

    @staticmethod
    def _check_weights(loop: LoopState, when: str) -> None:
        bad = [n for n, p in loop.plain.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(
                f"training stopped: weights {bad[:3]} became non-finite {when}; the last good checkpoint is kept. "
                "Lower train.lr or check the data"
            )


class ChargeDataset(Callback):
    """Charge the dataset-level ledger (privacy/spend.py) before each checkpoint, at the end, and at any stop.

    A stop part-way through an epoch (Ctrl-C, SIGTERM, a non-finite stop) leaves steps no checkpoint holds; their
    noisy sums were computed all the same, and the logs that no noise covers saw them. So they are charged too, as a
    data-parallel timeout charges them (train/distributed.py); a resume from the last checkpoint then counts them
    in its accountant (privacy/spend.py's reconciliation). Only a SIGKILL leaves them uncharged.
    """

    def __init__(self, spend):
        self.spend = spend

    def on_epoch_end(self, loop: LoopState, row: dict[str, Any]) -> None:
        self.spend.charge(loop.ledger)

    def on_train_end(self, loop: LoopState) -> None:
        self.spend.charge(loop.ledger)

    def on_train_stopped(self, loop: LoopState) -> str | None:
        self.spend.charge(loop.ledger)
        return "all charged to the dataset's privacy ledger" if self.spend.charged is not None else None


class Checkpointing(Callback):
    """Hand the resume payload to ``persist`` after every epoch (the caller writes it)."""

    def __init__(self, persist: Callable[[dict[str, Any]], None]):
        self.persist = persist

    def on_epoch_end(self, loop: LoopState, row: dict[str, Any]) -> None:
        self.persist(loop.payload())


@contextmanager
def all_evaluation(callbacks: list[Callback], model: nn.Module) -> Iterator[None]:
    contexts = [cb.evaluation(model) for cb in callbacks]
    for ctx in contexts:
        ctx.__enter__()
    try:
        yield
    finally:
        for ctx in reversed(contexts):
            ctx.__exit__(None, None, None)

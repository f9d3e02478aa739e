"""DP-SGD through Opacus, and the privacy ledger that is saved, resumed and enforced.

The ledger is Opacus' own accountant (PRV by default) plus the noise multiplier and sample rate it was
created with. Its state travels in every checkpoint, so a resumed run continues the same account and
epsilon never goes back to zero.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from aisec_train.config import PrivacyConfig


class BudgetExhausted(RuntimeError):
    """The privacy budget allows no further training step."""


class PrivacyLedger:
    """An Opacus accountant with the parameters it charges, and a look-ahead for the budget."""

    def __init__(self, accountant: str, delta: float):
        self.accountant_name = accountant
        self.delta = delta
        self.accountant = create_accountant(accountant)
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self) -> float:
        return _epsilon(self.accountant_name, self.accountant.history, self.delta)

    def steps_within(self, target_epsilon: float, limit: int) -> int:
        """The most total steps (spent plus new, up to ``limit``) whose epsilon stays <= the target."""
        assert self.noise_multiplier is not None and self.sample_rate is not None
        history = list(self.accountant.history)

        def eps_after(total: int) -> float:
            extra = total - self.steps
            added = [(self.noise_multiplier, self.sample_rate, extra)] if extra > 0 else []
            return _epsilon(self.accountant_name, history + added, self.delta)

        if eps_after(self.steps) > target_epsilon:
            return self.steps
        lo, hi = self.steps, limit  # invariant: eps_after(lo) <= target
        if eps_after(hi) <= target_epsilon:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if eps_after(mid) <= target_epsilon else (lo, mid)
        return lo

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant_name,
            "delta": self.delta,
            "history": [list(entry) for entry in self.accountant.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["accountant"] != self.accountant_name:
            raise BudgetExhausted(
                f"privacy.accountant={self.accountant_name!r} differs from the run's ledger "
                f"({state['accountant']!r}); resume with the accountant the run started with"
            )
        self.accountant.history = [tuple(entry) for entry in state["history"]]
        self.noise_multiplier = state["noise_multiplier"]
        self.sample_rate = state["sample_rate"]

    def summary(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant_name,
        }


def budget_limit(ledger: PrivacyLedger, target_epsilon: float, planned_steps: int) -> float:
    """The step count training must stop at (``inf`` when every planned step fits the target).

    Raises BudgetExhausted when not even one more step fits, before anything is trained or written.
    """
    max_steps = ledger.steps_within(target_epsilon, limit=planned_steps)
    if max_steps <= ledger.steps:
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon={ledger.epsilon():.3f} already spent of "
            f"privacy.target_epsilon={target_epsilon}; no further step fits. Nothing was "
            "changed; raise the target knowingly or start a new run directory"
        )
    return math.inf if max_steps >= planned_steps else max_steps


def _epsilon(accountant: str, history: list, delta: float) -> float:
    if not history:
        return 0.0
    fresh = create_accountant(accountant)
    fresh.history = list(history)
    return float(fresh.get_epsilon(delta=delta))


@dataclass
class PrivateTraining:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    loader: DataLoader
    grad_sample_mode: str


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    cfg: PrivacyConfig,
    *,
    ledger: PrivacyLedger,
    epochs: int,
) -> PrivateTraining:
    """Wrap model, optimizer and loader with Opacus; the noise comes from the ledger on resume.

    Always returns the four pieces (Opacus' ghost mode adds a criterion, hooks mode does not).
    """
    sample_rate = 1.0 / len(loader)
    if ledger.noise_multiplier is None:
        ledger.noise_multiplier = cfg.noise_multiplier or get_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=cfg.delta,
            sample_rate=sample_rate,
            epochs=epochs,
            accountant=cfg.accountant.value,
        )
    ledger.sample_rate = sample_rate
    engine = PrivacyEngine(accountant=cfg.accountant.value)
    engine.accountant = ledger.accountant  # every step is charged to the ledger's accountant
    mode = cfg.grad_sample_mode.value
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=cfg.poisson_sampling,
            grad_sample_mode=mode,
        )
    if mode == "ghost":
        private_model, private_optimizer, criterion, private_loader = wrapped
    else:
        private_model, private_optimizer, private_loader = wrapped
        criterion = nn.CrossEntropyLoss()
    return PrivateTraining(private_model, private_optimizer, criterion, private_loader, mode)


def quiet_known_warnings() -> None:
    """Silence Opacus' per-run warnings about settings chosen on purpose (docs/privacy.md): secure RNG off,
    full backward hooks on input-less modules, the RDP order at the edge of its range."""
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
    logging.getLogger("opacus").setLevel(logging.WARNING)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus' GradSampleModule and (DP)DDP wrappers (parameters are shared)."""
    while True:
        if hasattr(model, "_module"):  # GradSampleModule
            model = model._module
        elif isinstance(model, (DPDDP, DDP)):
            model = model.module
        else:
            return model

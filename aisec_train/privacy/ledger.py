"""The privacy ledger: an Opacus accountant with the parameters it charges, saved, resumed and enforced.

Its state travels in every checkpoint, so a resumed run continues the same account and epsilon never goes
back to zero.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from aisec_train.errors import ConfigError, Refusal
from aisec_train.privacy.accounting import epsilon
from aisec_train.privacy.budget import search_steps


class BudgetExhausted(Refusal, RuntimeError):
    """The privacy budget allows no further training step."""


class PrivacyLedger:
    """An Opacus accountant with the parameters it charges, and a look-ahead for the budget."""

    def __init__(self, accountant: str, delta: float):
        self.accountant_name = accountant
        self.delta = delta
        self.accountant = create_accountant(accountant)
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.max_grad_norm: float | None = None  # None: not known (a ledger saved before it was recorded)
        self.reproducible_noise: bool | None = None

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self) -> float:
        return epsilon(self.accountant_name, self.accountant.history, self.delta)

    def steps_within(self, target_epsilon: float, limit: int) -> int:
        """The most total steps (spent plus new, up to ``limit``) whose epsilon stays <= the target (exact: the
        budget's one step-count search, privacy/budget.py)."""
        assert self.noise_multiplier is not None and self.sample_rate is not None
        new = search_steps(
            self.accountant.history, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            target_epsilon=target_epsilon, limit=limit - self.steps, delta=self.delta,
            accountant=self.accountant_name,
        )  # fmt: skip
        return self.steps + new

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant_name,
            "delta": self.delta,
            "history": [list(entry) for entry in self.accountant.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "reproducible_noise": self.reproducible_noise,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("delta", self.delta) != self.delta:
            raise BudgetExhausted(
                f"privacy.delta={self.delta!r} differs from the run's ledger ({state['delta']!r}); a resume keeps "
                "the delta its epsilon was accounted at"
            )
        if state["accountant"] != self.accountant_name:
            raise BudgetExhausted(
                f"privacy.accountant={self.accountant_name!r} differs from the run's ledger "
                f"({state['accountant']!r}); resume with the accountant the run started with"
            )
        self.accountant.history = [tuple(entry) for entry in state["history"]]
        self.noise_multiplier = state["noise_multiplier"]
        self.sample_rate = state["sample_rate"]
        self.max_grad_norm = state.get("max_grad_norm")
        self.reproducible_noise = state.get("reproducible_noise")

    def summary(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant_name,
        }


def check_mechanism(ledger: PrivacyLedger, cfg: Any, sample_rate: float) -> None:
    """Refuse (ConfigError, one line) a config whose mechanism differs from the one ``ledger`` was charged for.

    A resumed run continues one account: its noise multiplier (when set explicitly), sample rate, clipping norm
    and noise source cannot change (delta and accountant are checked when the ledger is loaded).
    """
    if ledger.steps == 0:  # nothing charged yet: the noise may still be chosen (privacy.fit_to_budget)
        return
    fitted = getattr(cfg, "fit_to_budget", False)  # the fitted noise is the ledger's, not the config's
    mismatches = [
        ("privacy.noise_multiplier", None if fitted else cfg.noise_multiplier, ledger.noise_multiplier),
        ("privacy.max_grad_norm", cfg.max_grad_norm, ledger.max_grad_norm),
        ("the sample rate 1/ceil(n_train / train.batch_size)", sample_rate, ledger.sample_rate),
    ]
    for key, wanted, charged in mismatches:
        if wanted is not None and charged is not None and not math.isclose(wanted, charged, rel_tol=1e-9):
            raise ConfigError(
                f"{key}={wanted!r} is not allowed: this run's privacy ledger was charged at {charged!r}; a resume "
                "keeps its mechanism (use another hydra.run.dir for another one)"
            )
    noise = ledger.reproducible_noise
    if noise is not None and noise != cfg.reproducible_noise:
        raise ConfigError(
            f"privacy.reproducible_noise={cfg.reproducible_noise!r} is not allowed: this run started with "
            f"{noise!r}; a resume keeps its noise source (use another hydra.run.dir)"
        )


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


@functools.lru_cache(maxsize=256)
def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, epochs: int, accountant: str) -> float:
    """Opacus' noise calibration (``get_noise_multiplier``), remembered per process: every federated client with
    the same sample rate asks the same question, and at sample rates near 1/2 the RDP search takes ~10 s.
    An extreme target or delta the accountant cannot calibrate for is a ConfigError naming both, not a traceback."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                epochs=epochs,
                accountant=accountant,
            )
        )
    except (ValueError, ZeroDivisionError, OverflowError, FloatingPointError) as err:
        raise ConfigError(
            f"privacy.target_epsilon={target_epsilon:g} with privacy.delta={delta:g} cannot be reached by the "
            f"{accountant} accountant ({' '.join(str(err).split()) or type(err).__name__}): raise the target "
            "epsilon or delta (typical: epsilon 1-10, delta below 1/n, e.g. 1e-5)"
        ) from None

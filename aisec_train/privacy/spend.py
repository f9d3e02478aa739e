"""The run's account in the project's dataset-level privacy ledger (aisec_train/store): what the loop charges.

The ledger store charges privacy to the data across every run on it; the run's own
:class:`~aisec_train.privacy.ledger.PrivacyLedger` (in its checkpoints) still composes this run's steps. The loop
asks :meth:`DatasetSpend.begin` for the step limit the dataset's budget allows (every run composed), and
:meth:`charge` is called before every checkpoint, so a kill can leave the ledger ahead of a checkpoint (the
steps count) but never behind it. On resume, :meth:`begin` reconciles: steps the ledger charged beyond the
checkpoint (a kill lost them) are added to the run's accountant, and checkpoint steps the ledger never saw (a
run directory copied in, another store) are charged at once.

Admission, before the first step of a new run (never a silent stop part-way):

- ``budget_scope=dataset``: the planned steps must fit the dataset's remainder. When they do not (and the run's
  own target would not stop it first), the run is refused in one line naming the binding limit with its numbers
  and the choices, or, with ``privacy.fit_to_budget=true``, its noise is calibrated to what is left (:meth:`fit`).
- ``budget_scope=run``: the run is charged like any other; taking the dataset past its target needs
  ``privacy.budget_reason``, recorded in the ledger (who, when, why, how much).

A refused run leaves a ``refusal`` record (``aisec-train-ledger show`` lists it), never a run of 0 steps. The
handle is picklable: data-parallel rank 0 charges through it while the job process holds the dataset lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aisec_train.errors import stops_deferred
from aisec_train.privacy import DatasetLedger, compose_epsilon
from aisec_train.privacy.ledger import PrivacyLedger, calibrated_noise
from aisec_train.privacy.record_sets import SharedSpend
from aisec_train.store import BudgetError

_FIT_MARGIN = 1e-6  # calibrate to a hair under the target: the admission's step search must find every step


@dataclass
class DatasetSpend:
    ledger: DatasetLedger  # a delegate handle: the job process holds the dataset's lock
    run_id: str  # the run directory's absolute path (or the API call's id)
    scope: str  # "dataset" or "run"
    split_seed: int
    target_epsilon: float | None
    n_train: int
    delta_reason: str | None = None
    budget_reason: str | None = None  # budget_scope=run: the recorded reason to pass the dataset's target
    fit_to_budget: bool = False  # calibrate the noise to the dataset's remainder instead of refusing
    charged: int | None = None  # run-ledger steps already charged; None until begin() (no step taken without it)
    reconciled: int = 0  # steps the ledger had charged beyond the checkpoint resumed from (a kill lost them)
    fitted: dict[str, Any] | None = None  # what fit() changed, for the report
    exceeded: dict[str, Any] | None = None  # the exceed record this run committed
    admitted: int | None = None  # the dataset's allowed steps found at admission (reused by begin)
    shared: SharedSpend | None = None  # other datasets' spend on this run's records (privacy/record_sets.py)

    # -- before the first step ----------------------------------------------------------------------------------
    def fit(self, run: PrivacyLedger, privacy_cfg: Any, batches_per_epoch: int, epochs: int) -> None:
        """``privacy.fit_to_budget``: before Opacus is set up, raise the noise just enough that the planned steps
        fit the dataset's remainder (every run composed). Sets ``run.noise_multiplier``; a no-op when the run's own
        calibration already fits, on resume, or when nothing at all is left (admission then refuses)."""
        b = self.ledger.budget()
        if not self.fit_to_budget or self.scope != "dataset" or b is None or run.noise_multiplier is not None:
            return
        if self.run_id in self.ledger.runs():
            return
        rate, planned = 1.0 / batches_per_epoch, epochs * batches_per_epoch
        own = privacy_cfg.noise_multiplier or calibrated_noise(
            privacy_cfg.target_epsilon, privacy_cfg.delta, rate, epochs, privacy_cfg.accountant.value
        )
        history, target = self.ledger.history(), b["target_epsilon"] * (1 - _FIT_MARGIN)

        def after(noise: float) -> float:
            return compose_epsilon([*history, (noise, rate, planned)], delta=b["delta"], accountant=b["accountant"])

        if after(own) <= target or compose_epsilon(history, delta=b["delta"], accountant=b["accountant"]) >= target:
            return
        lo, hi = own, own * 2
        while after(hi) > target:
            lo, hi = hi, hi * 2
            if hi > 1e4:  # nothing useful is left: admission refuses with the numbers
                return
        for _ in range(24):  # geometric bisection: ~1e-4 relative on the noise
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if after(mid) <= target else (mid, hi)
        run.noise_multiplier = hi
        self.fitted = {
            "noise_multiplier_for_own_target": own,
            "noise_multiplier": hi,
            "dataset_epsilon_before": self.ledger.total_epsilon(),
            "dataset_target_epsilon": b["target_epsilon"],
            "planned_steps": planned,
        }

    def begin(self, run: PrivacyLedger, planned_steps: int) -> float:
        """Record (or check, on resume) the run before its first step; return the run-ledger step count training
        must stop at. Refuses (BudgetError, one line, recorded as a refusal) when the planned spend is not
        admitted."""
        noise, rate = run.noise_multiplier, run.sample_rate
        assert noise is not None and rate is not None
        new = self.run_id not in self.ledger.runs()
        try:
            self.ledger.begin_run(
                self.run_id, delta=run.delta, accountant=run.accountant_name, sample_rate=rate,
                noise_multiplier=noise, split_seed=self.split_seed, target_epsilon=self.target_epsilon,
                n_train=self.n_train, budget_scope=self.scope, delta_reason=self.delta_reason,
                admit=lambda: self._admit(run, planned_steps),
            )  # fmt: skip
        except BudgetError as err:
            if new:
                self.ledger.refusal(self.run_id, str(err))
            raise
        if not new and self.scope == "run":  # a resume may plan more steps than its first start recorded
            self._admit(run, planned_steps)
        recorded = self.ledger.steps(self.run_id)
        if recorded > run.steps:  # killed after a charge, before its checkpoint: those steps were spent
            self.reconciled = recorded - run.steps
            run.accountant.history.append((noise, rate, self.reconciled))
        elif recorded < run.steps:  # a checkpoint this ledger never saw (copied in, another store): charge it now
            self.ledger.charge(self.run_id, [(noise, rate, run.steps - recorded)])
            self.admitted = None
        self.charged = run.steps
        if self.scope == "run":  # admitted against the records' target above; its own target stops the loop
            return math.inf
        if new and self.admitted is not None:
            if self.admitted <= 0:  # (admission refuses this; kept as a guard)
                raise BudgetError(f"privacy budget exhausted for dataset {self.ledger.dataset[:16]}")
            return run.steps + self.admitted
        allowed = self.ledger.require_steps(noise_multiplier=noise, sample_rate=rate, limit=planned_steps)
        if self.shared is not None:
            allowed = self.shared.require_steps(self.ledger, noise_multiplier=noise, sample_rate=rate, limit=allowed)
        return run.steps + allowed

    def _admit(self, run: PrivacyLedger, planned: int) -> None:
        if self.scope == "run":  # even without a budget of its own: its records may be spent through a copy
            self._admit_past_target(run, planned)
            return
        b = self.ledger.budget()
        if b is None:  # (begin_run gives every dataset-scoped run a budget before admitting it)
            return
        noise, rate = run.noise_multiplier, run.sample_rate
        self.admitted = self.ledger.steps_within(noise_multiplier=noise, sample_rate=rate, limit=planned)
        if self.shared is not None:  # every record within its target, all datasets holding it composed
            self.admitted = self.shared.require_steps(
                self.ledger, noise_multiplier=noise, sample_rate=rate, limit=self.admitted
            )
        if self.admitted >= planned:
            return
        own = self._own_steps(run, planned)
        if own <= 0:
            raise BudgetError(
                f"privacy budget exhausted: not one step at noise {noise:.3f}, sample rate {rate:.4g} fits the run's "
                f"own privacy.target_epsilon={self.target_epsilon} (the binding limit: the run's own target); nothing "
                "was trained. Raise privacy.target_epsilon or privacy.noise_multiplier, or leave the noise unset"
            )
        if own <= self.admitted:  # the run's own target stops it first (a budget stop, shown as one)
            return
        raise BudgetError(self._does_not_fit(run, planned, b))

    def _own_steps(self, run: PrivacyLedger, planned: int) -> int:
        if self.target_epsilon is None:
            return planned
        return run.steps_within(self.target_epsilon, limit=run.steps + planned) - run.steps

    def _epsilon_after(self, run: PrivacyLedger, planned: int, b: dict[str, Any]) -> float:
        added = (run.noise_multiplier, run.sample_rate, planned)
        return compose_epsilon([*self.ledger.history(), added], delta=b["delta"], accountant=b["accountant"])

    def _does_not_fit(self, run: PrivacyLedger, planned: int, b: dict[str, Any]) -> str:
        led, allowed = self.ledger, self.admitted or 0
        noise, rate = run.noise_multiplier, run.sample_rate
        spent, after = led.total_epsilon(), self._epsilon_after(run, planned, b)
        runs = len({r["run_id"] for r in led.of_kind("charge")})
        head = (
            f"privacy budget exhausted for dataset {led.dataset[:16]}"
            if allowed <= 0
            else f"privacy budget of dataset {led.dataset[:16]} cannot take this run"
        )
        spending = f"{planned} planned steps (noise {noise:.3f}, sample rate {rate:.4g}, its own target " + (
            f"{self.target_epsilon})"
        )
        own_allowed = led.steps_within(noise_multiplier=noise, sample_rate=rate, limit=planned)
        if self.shared is not None and self.shared.groups and allowed < own_allowed:  # a copy's spend binds
            what, spent, after, target = self.shared.binding(led, (noise, rate, planned))
            return (
                f"{head}: {what} are at epsilon {spent:.3f} of their target {target}, every run on them composed; "
                f"this run's {spending} would take them to {after:.3f}, and only {allowed} step(s) fit. The binding "
                "limit is those records' remainder (records are charged by content, whichever file holds them); "
                "nothing was trained. "
                + led.choices(after)
                + ("; or privacy.fit_to_budget=true (calibrate the noise to what is left)" if allowed > 0 else "")
            )
        return (
            f"{head}: epsilon {spent:.3f} of its target {b['target_epsilon']} is spent by {runs} run(s); this run's "
            f"{spending} would take the records to {after:.3f}, and only {allowed} step(s) fit. "
            "The binding limit is the dataset's remainder, not the run's own target; nothing was trained. "
            + led.choices(after)
            + ("; or privacy.fit_to_budget=true (calibrate the noise to what is left)" if allowed > 0 else "")
        )

    def _admit_past_target(self, run: PrivacyLedger, planned: int) -> None:
        """budget_scope=run: past the records' target only on record, every dataset holding them composed (a copy of
        spent records is held to them exactly as its original is), at one delta by one accountant."""
        added = (run.noise_multiplier, run.sample_rate, planned)
        terms = self.ledger.budget() or {"delta": run.delta, "accountant": run.accountant_name}
        shared = self.shared.limits(self.ledger, terms) if self.shared is not None else []
        record = self.ledger.admit_past_target(
            self.run_id, added, why=self.budget_reason, own_target=self.target_epsilon, terms=terms, shared=shared
        )
        self.exceeded = record or self.exceeded

    # -- during and after ---------------------------------------------------------------------------------------
    def charge(self, run: PrivacyLedger) -> None:
        """Record the steps taken since the last charge (call it before the checkpoint that holds them)."""
        if self.charged is None:  # begin() never ran: nothing was left to train, so nothing was spent
            return
        new = run.steps - self.charged
        if new > 0:
            with stops_deferred():  # a signal between the write and the count would charge these steps twice
                self.ledger.charge(self.run_id, [(run.noise_multiplier, run.sample_rate, new)])
                self.charged = run.steps

    def summary(self) -> dict:
        """The dataset-level account for the report and model card: the records' total composed spend."""
        led = self.ledger
        spent, target = led.spent_epsilon(self.run_id), led.target_epsilon
        return {
            "scope": self.scope,
            "dataset_epsilon": spent,
            "dataset_target_epsilon": target,
            "dataset_exceeded": target is not None and spent > target + 1e-9,
            "dataset_runs": len(led.runs()),
            "dataset_refusals": len(led.of_kind("refusal")),
            "dataset_raises": [
                {k: r[k] for k in ("target_epsilon", "previous", "why", "who", "at")} for r in led.of_kind("raise")
            ],
            "dataset_exceeds": [
                {k: r[k] for k in ("run_id", "target_epsilon", "epsilon_before", "epsilon_after", "why", "who", "at")}
                for r in led.of_kind("exceed")
            ],
            "fit_to_budget": self.fitted,
        } | ({"records": self.shared.summary(led, self._terms())} if self.shared is not None else {})

    def _terms(self) -> dict[str, Any] | None:
        """The run's recorded delta and accountant: what its records' spend is composed at while the dataset has no
        budget yet (only budget_scope=run runs without a target so far)."""
        return self.ledger.runs().get(self.run_id, {}).get("invariants")


def new_spend(cfg: Any, ledger: DatasetLedger, run_id: str, split_seed: int, n_train: int) -> DatasetSpend:
    """The run's account from its config; ``privacy.fit_to_budget`` is for the central trainer only (the
    data-parallel ranks and federated clients each calibrate their own noise)."""
    from aisec_train.errors import ConfigError

    privacy = cfg.privacy
    central = cfg.federated.mode.value == "none" and cfg.train.distributed.nproc == 1
    if privacy.fit_to_budget and not central:
        raise ConfigError(
            "privacy.fit_to_budget=true is not allowed with federated or data-parallel training: only the central "
            "trainer calibrates its noise to the dataset's remainder"
        )
    return DatasetSpend(
        ledger, run_id, privacy.budget_scope.value, split_seed, privacy.target_epsilon, n_train,
        privacy.delta_reason, privacy.budget_reason, privacy.fit_to_budget,
    )  # fmt: skip


def store_record(store: Any) -> dict[str, Any]:
    """What the report says about the store charged: its path, why that one, and whether it is the team's."""
    choice = store.choice
    return {"ledger_store": str(choice.path), "ledger_store_source": choice.source, "ledger_scratch": choice.scratch}

"""The run's account in the project's dataset-level privacy ledger (aisec_train/store): what the loop charges.

The ledger store charges privacy to the data (its manifest hash), across every run on it; the run's own
:class:`~aisec_train.train.ledger.PrivacyLedger` (in its checkpoints) still composes this run's steps. The loop
asks :meth:`DatasetSpend.begin` for the step limit the dataset's budget allows (every run composed), and
:meth:`charge` is called before every checkpoint, so a kill can leave the ledger ahead of a checkpoint (the
steps count) but never behind it. On resume, :meth:`begin` reconciles: steps the ledger charged beyond the
checkpoint (a kill lost them) are added to the run's accountant, and checkpoint steps the ledger never saw (a
run directory copied in, another store) are charged at once. Under ``privacy.budget_scope=run`` the run is
still recorded and charged, but only its own target limits it (the first round's behaviour; the report and
model card say so).

The handle is picklable: data-parallel rank 0 charges through it while the job process holds the dataset lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aisec_train.store import DatasetLedger
from aisec_train.train.ledger import PrivacyLedger


@dataclass
class DatasetSpend:
    ledger: DatasetLedger  # a delegate handle: the job process holds the dataset's lock
    run_id: str  # the run directory's absolute path
    scope: str  # "dataset" or "run"
    split_seed: int
    target_epsilon: float | None
    n_train: int
    delta_reason: str | None = None
    charged: int | None = None  # run-ledger steps already charged; None until begin() (no step taken without it)
    reconciled: int = 0  # steps the ledger had charged beyond the checkpoint resumed from (a kill lost them)

    def begin(self, run: PrivacyLedger, planned_steps: int) -> float:
        """Record (or check, on resume) the run before its first step; return the run-ledger step count training
        must stop at. Refuses (BudgetError, one line) when the dataset's budget allows no step."""
        noise, rate = run.noise_multiplier, run.sample_rate
        assert noise is not None and rate is not None
        self.ledger.begin_run(
            self.run_id, delta=run.delta, accountant=run.accountant_name, sample_rate=rate, noise_multiplier=noise,
            split_seed=self.split_seed, target_epsilon=self.target_epsilon, n_train=self.n_train,
            budget_scope=self.scope, delta_reason=self.delta_reason,
        )  # fmt: skip
        recorded = self.ledger.steps(self.run_id)
        if recorded > run.steps:  # killed after a charge, before its checkpoint: those steps were spent
            self.reconciled = recorded - run.steps
            run.accountant.history.append((noise, rate, self.reconciled))
        elif recorded < run.steps:  # a checkpoint this ledger never saw (copied in, another store): charge it now
            self.ledger.charge(self.run_id, [(noise, rate, run.steps - recorded)])
        self.charged = run.steps
        if self.scope == "run":
            return math.inf
        allowed = self.ledger.require_steps(
            noise_multiplier=noise, sample_rate=rate, limit=planned_steps, target_epsilon=self.target_epsilon
        )
        return run.steps + allowed

    def charge(self, run: PrivacyLedger) -> None:
        """Record the steps taken since the last charge (call it before the checkpoint that holds them)."""
        if self.charged is None:  # begin() never ran: nothing was left to train, so nothing was spent
            return
        new = run.steps - self.charged
        if new > 0:
            self.ledger.charge(self.run_id, [(run.noise_multiplier, run.sample_rate, new)])
            self.charged = run.steps

    def summary(self) -> dict:
        records = self.ledger.records
        return {
            "scope": self.scope,
            "dataset_epsilon": self.ledger.spent_epsilon(self.run_id),
            "dataset_target_epsilon": self.ledger.target_epsilon,
            "dataset_runs": len({r["run_id"] for r in records if r["kind"] == "run"}),
            "dataset_raises": [
                {k: r[k] for k in ("target_epsilon", "previous", "why", "who", "at")}
                for r in records
                if r["kind"] == "raise"
            ],
        }

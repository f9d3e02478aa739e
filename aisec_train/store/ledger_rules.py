"""What a dataset ledger means: its budget, its runs and their invariants, the composed spend, and the rules.

The dataset's budget (target epsilon, delta, accountant) is fixed by the first dataset-scoped run and changes only
by an explicit, recorded raise (who, when, why). Every run records its invariants; a resume that changes one is
refused. Charges are recorded whatever they cost (a spend that happened is never refused); the budget is enforced
before steps are taken, through ``steps_within`` / ``require_steps``.
"""

from __future__ import annotations

import math
from typing import Any

from aisec_train.store import budget
from aisec_train.store.errors import BudgetError

INVARIANTS = ("delta", "accountant", "sample_rate", "noise_multiplier", "split_seed", "budget_scope")
SCOPES = ("dataset", "run")


class LedgerRules:
    """Mixed into DatasetLedger, which provides ``records``, ``_commit`` and ``dataset``."""

    records: list[dict[str, Any]]
    dataset: str

    def _commit(self, kind: str, **fields: Any) -> dict[str, Any]:  # pragma: no cover - provided by the store
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------------------------------------
    def budget(self) -> dict[str, Any] | None:
        """{target_epsilon, delta, accountant} in force (raises applied), or None before the first run."""
        found: dict[str, Any] | None = None
        for r in self.records:
            if r["kind"] == "budget" and found is None:
                found = {"target_epsilon": r["target_epsilon"], "delta": r["delta"], "accountant": r["accountant"]}
            elif r["kind"] == "raise" and found is not None:
                found["target_epsilon"] = r["target_epsilon"]
        return found

    @property
    def target_epsilon(self) -> float | None:
        b = self.budget()
        return None if b is None else float(b["target_epsilon"])

    def runs(self) -> dict[str, dict[str, Any]]:
        return {r["run_id"]: r for r in self.records if r["kind"] == "run"}

    def history(self, run_id: str | None = None, *, exclude_run: str | None = None) -> budget.History:
        """Merged accountant history of every charge (of ``run_id`` only, or of every run but ``exclude_run``)."""
        entries = [
            tuple(e)
            for r in self.records
            if r["kind"] == "charge" and run_id in (None, r["run_id"]) and r["run_id"] != exclude_run
            for e in r["history"]
        ]
        return budget.merge(entries)  # type: ignore[arg-type]

    def steps(self, run_id: str | None = None) -> int:
        return sum(steps for _, _, steps in self.history(run_id))

    def total_epsilon(self, delta: float | None = None, accountant: str | None = None, *, run_id=None) -> float:
        """Epsilon of every run on this dataset composed (default: at the budget's delta, by its accountant)."""
        b = self.budget() or {}
        delta, accountant = delta or b.get("delta"), accountant or b.get("accountant")
        if delta is None or accountant is None:
            if not self.history(run_id):
                return 0.0
            raise BudgetError(f"dataset {self.dataset[:16]} has no budget yet; pass delta and accountant")
        return budget.compose_epsilon(self.history(run_id), delta=delta, accountant=accountant)

    def spent_epsilon(self, run_id: str) -> float:
        """Every run on this dataset composed, at the budget's delta and accountant; without a budget yet (only
        ``budget_scope=run`` runs so far), at ``run_id``'s own recorded delta and accountant."""
        if self.budget() is not None:
            return self.total_epsilon()
        terms = self.runs().get(run_id, {}).get("invariants", {})
        return self.total_epsilon(terms.get("delta"), terms.get("accountant"))

    # -- runs and invariants ------------------------------------------------------------------------------------
    def check_invariants(self, run_id: str, **invariants: Any) -> None:
        """Refuse (one line) a resume of ``run_id`` that changes any recorded invariant."""
        run = self.runs().get(run_id)
        if run is None:
            return
        recorded = run["invariants"]
        for key, value in invariants.items():
            old = recorded.get(key)
            same = math.isclose(old, value, rel_tol=1e-12) if _numbers(old, value) else old == value
            if not same:
                raise BudgetError(
                    f"{_config_key(key)}={value!r} differs from {old!r} recorded when run {run_id} started on dataset "
                    f"{self.dataset[:16]}; a resume keeps its invariants (use another run directory)"
                )

    def begin_run(
        self,
        run_id: str,
        *,
        delta: float,
        accountant: str,
        sample_rate: float,
        noise_multiplier: float,
        split_seed: int,
        target_epsilon: float | None,
        n_train: int,
        budget_scope: str = "dataset",
        delta_reason: str | None = None,
    ) -> dict[str, Any]:
        """Record a new run (or check a resumed one's invariants) before its first step; return its record.

        The first dataset-scoped run fixes the dataset's budget; a later run must use the same delta and accountant
        and a target no higher than the recorded one (raise it first: ``raise_target``). ``delta`` >= 1/n needs a
        ``delta_reason``, recorded with the run.
        """
        if budget_scope not in SCOPES:
            raise BudgetError(f"privacy.budget_scope={budget_scope!r} is not allowed: one of {SCOPES}")
        override = budget.check_delta(delta, n_train, reason=delta_reason)
        # plain Python numbers from here on (numpy scalars are accepted, but JSON and the tags want these)
        delta, sample_rate, noise_multiplier, n_train = (
            float(delta),
            float(sample_rate),
            float(noise_multiplier),
            int(n_train),
        )
        split_seed = int(split_seed)
        values = (delta, accountant, sample_rate, noise_multiplier, split_seed, budget_scope)
        invariants = dict(zip(INVARIANTS, values, strict=True))
        if target_epsilon is not None:
            target_epsilon = budget.check_target_epsilon(target_epsilon)
        if budget_scope == "dataset":
            self._check_budget(run_id, delta, accountant, target_epsilon)
        if run_id in self.runs():
            self.check_invariants(run_id, **invariants)
            return self.runs()[run_id]
        if budget_scope == "dataset" and self.budget() is None:
            if target_epsilon is None:
                raise BudgetError(f"dataset {self.dataset[:16]} has no budget yet: set privacy.target_epsilon")
            self._commit("budget", run_id=run_id, target_epsilon=target_epsilon, delta=delta, accountant=accountant)
        if override:
            self._commit("delta_override", run_id=run_id, delta=delta, n_train=n_train, why=str(delta_reason))
        return self._commit("run", run_id=run_id, invariants=invariants, target_epsilon=target_epsilon, n_train=n_train)

    def _check_budget(self, run_id: str, delta: float, accountant: str, target: float | None) -> None:
        b = self.budget()
        if b is None:
            return
        for key, value in (("delta", delta), ("accountant", accountant)):
            if value != b[key]:
                raise BudgetError(
                    f"privacy.{key}={value!r} differs from the budget of dataset {self.dataset[:16]} "
                    f"({key} {b[key]!r}); every run on the same data is accounted at one delta by one accountant"
                )
        if target is not None and target > b["target_epsilon"] + 1e-12:
            raise BudgetError(
                f"privacy.target_epsilon={target} exceeds the recorded budget {b['target_epsilon']} of dataset "
                f"{self.dataset[:16]}; raising it is a recorded act: aisec-train-ledger raise-target {self.dataset} "
                f"--epsilon {target} --why TEXT"
            )

    # -- the budget ---------------------------------------------------------------------------------------------
    def steps_within(
        self, *, noise_multiplier: float, sample_rate: float, limit: int, target_epsilon: float | None = None
    ) -> int:
        """How many more steps at (noise, sample rate) fit the dataset's budget, every run composed (0..limit).
        ``target_epsilon`` (a run's own, lower target) tightens it."""
        b = self.budget()
        if b is None:
            raise BudgetError(f"dataset {self.dataset[:16]} has no budget; call begin_run first")
        target = b["target_epsilon"] if target_epsilon is None else min(target_epsilon, b["target_epsilon"])
        return budget.steps_within(
            self.history(),
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            target_epsilon=target,
            limit=limit,
            delta=b["delta"],
            accountant=b["accountant"],
        )

    def require_steps(self, **kwargs: Any) -> int:
        """``steps_within``, refusing (one line) when not even one step fits."""
        allowed = self.steps_within(**kwargs)
        if allowed <= 0:
            runs = len({r["run_id"] for r in self.records if r["kind"] == "charge"})
            raise BudgetError(
                f"privacy budget exhausted for dataset {self.dataset[:16]}: epsilon {self.total_epsilon():.3f} spent "
                f"by {runs} run(s) of target {self.target_epsilon}; nothing was trained. Raise it knowingly: "
                f"aisec-train-ledger raise-target {self.dataset} --epsilon E --why TEXT"
            )
        return allowed

    def charge(self, run_id: str, history_delta: list[tuple[float, float, int]]) -> dict[str, Any] | None:
        """Record steps just taken by ``run_id`` (Opacus history entries). Call it before (never after) the
        checkpoint that contains those steps is committed, so a kill leaves the ledger >= the real spend."""
        if run_id not in self.runs():
            raise BudgetError(f"run {run_id} is not recorded on dataset {self.dataset[:16]}; call begin_run first")
        entries = [budget.check_entry(e, f"charge of run {run_id}") for e in history_delta]
        if not entries:
            return None
        return self._commit("charge", run_id=run_id, history=[list(e) for e in budget.merge(entries)])

    def raise_target(self, new_epsilon: float, *, why: str) -> dict[str, Any]:
        """Raise the dataset's target: an explicit record of who, when and why (never a silent override)."""
        b = self.budget()
        new_epsilon = budget.check_target_epsilon(new_epsilon, "--epsilon")
        if b is None:
            raise BudgetError(f"dataset {self.dataset[:16]} has no budget to raise; train on it first")
        if not why or not why.strip():
            raise BudgetError("--why is required: a raise of a privacy target records its reason")
        if new_epsilon <= b["target_epsilon"]:
            raise BudgetError(f"--epsilon {new_epsilon} is not above the current target {b['target_epsilon']}")
        return self._commit("raise", target_epsilon=new_epsilon, previous=b["target_epsilon"], why=why.strip())


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _config_key(key: str) -> str:
    return {"split_seed": "train.seed"}.get(key, f"privacy.{key}")

"""What a dataset ledger means: its budget, its runs and their invariants, the composed spend, and the rules.

The dataset's budget (target epsilon, delta, accountant) is fixed by the first run on it and changes only by an
explicit, recorded raise (who, when, why; the target at most ``MAX_TARGET_EPSILON``). Every run records its
invariants; a resume that changes one is refused. Charges are recorded whatever they cost (a spend that happened is
never refused); the budget is enforced before steps are taken, through ``steps_within`` / ``require_steps``. A
``budget_scope=run`` run is charged like any other; it may pass the dataset's target only with a recorded reason
(``exceed``: who, when, why, how much). A run refused before its first step leaves a ``refusal`` record, not a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aisec_train.privacy import budget
from aisec_train.store.errors import BudgetError

if TYPE_CHECKING:
    from aisec_train.privacy.accounting import History

INVARIANTS = ("delta", "accountant", "sample_rate", "noise_multiplier", "split_seed", "budget_scope")
SCOPES = ("dataset", "run")
# A documented ceiling on any dataset target: past it DP says nothing useful (e^100), so a raise beyond it is a typo
# or a bypass, not a decision.
MAX_TARGET_EPSILON = 100.0
MAX_REASON_CHARS = 200


def check_reason(why: object, key: str) -> str:
    """A recorded reason: one line of printable text, at most ``MAX_REASON_CHARS`` characters."""
    text = str(why).strip() if why is not None else ""
    if not text:
        raise BudgetError(f"{key} is required: the reason is recorded in the dataset's ledger")
    if not text.isprintable() or len(text) > MAX_REASON_CHARS:
        shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
        raise BudgetError(
            f"{key}={shown} is not allowed: one line of printable text, at most {MAX_REASON_CHARS} characters"
        )
    return text


class LedgerRules:
    """Mixed into DatasetLedger, which provides ``records``, ``_commit`` and ``dataset``."""

    records: list[dict[str, Any]]
    dataset: str
    store: Path
    # The budget a first run proposes while its admission runs: seen by ``budget()`` but committed only once the
    # run is admitted, so a refused first run cannot fix the dataset's budget (its delta, accountant and target).
    _proposed: dict[str, Any] | None = None

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
        if found is None and self._proposed is not None:
            return dict(self._proposed)
        return found

    @property
    def target_epsilon(self) -> float | None:
        b = self.budget()
        return None if b is None else float(b["target_epsilon"])

    def runs(self) -> dict[str, dict[str, Any]]:
        return {r["run_id"]: r for r in self.records if r["kind"] == "run"}

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    def choices(self, epsilon: float | None = None, *, run_scope: bool = False, raise_here: bool = True) -> str:
        """The ways forward a budget refusal offers, with the exact raise command (``raise_here=False`` when other
        datasets' targets bind: raising this one's would not help)."""
        wanted = "E" if epsilon is None else f"{min(MAX_TARGET_EPSILON, math.ceil(epsilon * 100) / 100):g}"
        reason = "privacy.budget_reason=TEXT to pass it on record (who, when, why, how much); " if run_scope else ""
        raise_ = (
            f"a recorded raise (aisec-train-ledger --store {self.store} raise-target {self.dataset} --epsilon "
            f"{wanted} --why TEXT); "
            if raise_here
            else ""
        )
        return (
            f"choices: {reason}{raise_}privacy=none (no DP guarantee); or a scratch store for experiments, not the "
            "team's ledger (privacy.ledger_store=scratch)"
        )

    def history(self, run_id: str | None = None, *, exclude_run: str | None = None) -> History:
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
        admit: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Record a new run (or check a resumed one's invariants) before its first step; return its record.

        The first run fixes the dataset's budget; a later dataset-scoped run must use the same delta and accountant
        and a target no higher than the recorded one (raise it first: ``raise_target``). ``delta`` >= 1/n needs a
        ``delta_reason``, recorded with the run. ``admit`` (the caller's check of the planned spend) runs after the
        budget is known and before a new run is recorded: a run it refuses is never listed as a run, and a first run
        it refuses leaves no budget behind.
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
        if self.budget() is None and (budget_scope == "dataset" or target_epsilon is not None):
            if target_epsilon is None:
                raise BudgetError(f"dataset {self.dataset[:16]} has no budget yet: set privacy.target_epsilon")
            if target_epsilon > MAX_TARGET_EPSILON:
                raise BudgetError(
                    f"privacy.target_epsilon={target_epsilon} is not allowed as the budget of dataset "
                    f"{self.dataset[:16]}: at most {MAX_TARGET_EPSILON:g}"
                )
            proposed = {"target_epsilon": target_epsilon, "delta": delta, "accountant": accountant}
            self._proposed = proposed  # admission sees the budget it would commit ...
            try:
                if admit is not None:
                    admit()
            finally:
                self._proposed = None
            # ... and only an admitted run commits it: the ledger of a refused first run is left as it was
            self._commit("budget", run_id=run_id, **proposed)
        elif admit is not None:
            admit()
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
                f"{self.dataset[:16]} (the binding limit: the dataset's target, not the run's own); "
                + self.choices(target)
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
                f"by {runs} run(s) of target {self.target_epsilon} (the binding limit: the dataset's remainder, "
                f"0 steps); nothing was trained. " + self.choices()
            )
        return allowed

    def admit_past_target(
        self, run_id: str, added: tuple[float, float, int], *, why: str | None, own_target: float | None,
        terms: dict[str, Any] | None = None, shared: Sequence[tuple[History, float | None, str]] = (),
    ) -> dict[str, Any] | None:  # fmt: skip
        """A run-scoped run's planned ``added`` spend (noise, sample rate, steps): refused (one line, the numbers and
        the choices) when it takes the records past their target without ``why``; with it, recorded as an
        ``exceed`` (once per run, unless a resume plans more). Returns the new record, if any.

        ``shared``: for records other datasets also hold, (those datasets' history, their smallest target, which
        records): such a record's spend is this dataset's and theirs composed and its target the smallest of them
        all, so a copy of spent records passes their target only on record, as its original would. ``terms``
        ({delta, accountant}) compose the spend while this dataset has no budget of its own (the run's)."""
        b = self.budget()
        terms = b or terms
        if terms is None:
            return None
        own = None if b is None else float(b["target_epsilon"])
        limits = [(self.history(), own, None)]
        for history, target, which in shared:
            smallest = min((t for t in (own, target) if t is not None), default=None)
            limits.append(([*self.history(), *history], smallest, which))
        past = []  # (how far past, target, spend before, spend after, which records)
        for prior, target, which in limits:
            if target is None:
                continue
            after = budget.compose_epsilon([*prior, added], delta=terms["delta"], accountant=terms["accountant"])
            if after > target + 1e-9:
                before = budget.compose_epsilon(prior, delta=terms["delta"], accountant=terms["accountant"])
                past.append((after - target, target, before, after, which))
        if not past:
            return None
        _, target, before, after, which = max(past, key=lambda p: p[0])  # the record furthest past its target
        if not why:
            whose = "the dataset's target" if which is None else "the records' target"
            raise BudgetError(
                f"privacy.budget_scope=run still charges dataset {self.dataset[:16]}: this run's {added[2]} planned "
                f"steps would take the records to epsilon {after:.3f}, past "
                + (f"the dataset's target {target}" if which is None else f"the target {target} of {which}")
                + f" ({before:.3f} spent by earlier runs; the binding limit is {whose}, not the run's own "
                f"{own_target}). Passing it is a recorded act: "
                + self.choices(after, run_scope=True, raise_here=which is None)
            )
        recorded = [r["epsilon_after"] for r in self.of_kind("exceed") if r["run_id"] == run_id]
        if recorded and max(recorded) >= after - 1e-9:  # a resume within what its first start recorded
            return None
        return self.exceed(run_id, target_epsilon=target, epsilon_before=before, epsilon_after=after, why=why)

    def exceed(
        self, run_id: str, *, target_epsilon: float, epsilon_before: float, epsilon_after: float, why: str
    ) -> dict[str, Any]:
        """Record that ``run_id`` (budget_scope=run) may take the records past their target: who, when, why, how
        much (the records' composed spend before and after, and the target passed)."""
        why = check_reason(why, "privacy.budget_reason")
        return self._commit(
            "exceed", run_id=run_id, target_epsilon=float(target_epsilon), epsilon_before=float(epsilon_before),
            epsilon_after=float(epsilon_after), why=why,
        )  # fmt: skip

    def refusal(self, run_id: str, why: str) -> dict[str, Any]:
        """Record a run refused before its first step (``ledger show`` lists it as a refusal, not a run)."""
        return self._commit("refusal", run_id=run_id, why=" ".join(str(why).split())[:1000])

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
        if new_epsilon > MAX_TARGET_EPSILON:
            raise BudgetError(
                f"--epsilon={new_epsilon:g} is not allowed: a dataset's target is at most {MAX_TARGET_EPSILON:g}"
            )
        why = check_reason(why, "--why")
        if b is None:
            raise BudgetError(f"dataset {self.dataset[:16]} has no budget to raise; train on it first")
        if new_epsilon <= b["target_epsilon"]:
            raise BudgetError(f"--epsilon {new_epsilon} is not above the current target {b['target_epsilon']}")
        return self._commit("raise", target_epsilon=new_epsilon, previous=b["target_epsilon"], why=why)


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _config_key(key: str) -> str:
    return {"split_seed": "train.seed"}.get(key, f"privacy.{key}")

"""What the model card, the security report and the console say about the dataset's privacy budget: the records'
total composed spend across runs, the store charged (and whether it is the team's), a recorded pass of the
dataset's target, a noise fitted to the remainder, and a stop by the budget (never silent)."""

from __future__ import annotations

from typing import Any


def stop_line(report: Any) -> str | None:
    """One sentence when the privacy budget stopped training before its planned epochs, else None."""
    train, privacy = report.sections.get("train", {}), report.sections.get("privacy", {})
    if not train.get("stopped_by_budget"):
        return None
    return (
        f"training was stopped by the privacy budget after {privacy.get('steps')} step(s) "
        f"({train.get('epochs_completed')} of {train.get('epochs_planned')} planned epochs; epsilon "
        f"{_num(privacy.get('epsilon'))} of the run's target {privacy.get('target_epsilon')}): the model is "
        "under-trained; a larger noise or fewer epochs plan a run that fits"
    )


def budget_lines(report: Any) -> list[str]:
    """Markdown bullet lines (empty without DP)."""
    privacy = report.sections.get("privacy", {})
    lines = []
    stop = stop_line(report)
    if stop:
        lines.append(f"- **Stopped by the budget:** {stop}.")
    b = privacy.get("budget")
    if not b:
        return lines
    store = f"`{privacy.get('ledger_store')}`"
    store += (
        " (a scratch store for experiments: **not the team's ledger**, this spend is on no shared record)"
        if privacy.get("ledger_scratch")
        else f" (chosen by {privacy.get('ledger_store_source')})"
    )
    lines.append(
        f"- **The records' total spend:** epsilon {_num(b.get('dataset_epsilon'))} of the dataset's target "
        f"{b.get('dataset_target_epsilon')}, every run on this data composed ({b.get('dataset_runs')} run(s), "
        f"budget scope of this run: {b.get('scope')}); ledger store {store}."
    )
    for e in b.get("dataset_exceeds") or []:
        lines.append(
            f"- **Target passed on record:** {e['who']} at {e['at']}: epsilon {_num(e['epsilon_before'])} -> "
            f"{_num(e['epsilon_after'])} planned, past the target {e['target_epsilon']}; reason: {e['why']}"
        )
    fit = b.get("fit_to_budget")
    if fit:
        lines.append(
            f"- **Noise fitted to the remainder** (privacy.fit_to_budget): noise multiplier "
            f"{_num(fit['noise_multiplier_for_own_target'])} -> {_num(fit['noise_multiplier'])} so that "
            f"{fit['planned_steps']} steps fit what was left of the dataset's target {fit['dataset_target_epsilon']}"
        )
    return lines


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else str(value)


def budget_section(report: Any) -> list[str]:
    """``budget_lines`` followed by a blank line, or nothing (for a markdown document's flow)."""
    lines = budget_lines(report)
    return [*lines, ""] if lines else []


def records_spent(report: Any) -> str:
    """The DP checklist item's tail: the records' composed spend across runs ('' without a dataset ledger)."""
    b = report.sections.get("privacy", {}).get("budget") or {}
    if b.get("dataset_epsilon") is None:
        return ""
    records = b.get("records") or {}  # privacy/record_sets.py: other datasets holding the same records compose too
    exceeded = b.get("dataset_exceeded") or records.get("exceeded")
    passed = " (passed on record: see the ledger's exceed records)" if exceeded else ""
    spent = max(b["dataset_epsilon"], records.get("epsilon_max") or 0.0)
    shared = len(records.get("shared_with") or {})
    also = f" and on {shared} other dataset(s) holding some of the same records" if shared else ""
    # A record another dataset also holds may have a lower target than this dataset (or this one none yet): the
    # spend is then stated against the target of the record that spent most.
    target, whose = b.get("dataset_target_epsilon"), "the dataset's"
    theirs = records.get("target_epsilon")
    if theirs is not None and (target is None or theirs < target):
        target, whose = theirs, "the records'"
    return (
        f"; the records' composed spend across {b.get('dataset_runs')} run(s){also}: epsilon "
        f"{_num(spent)} of {whose} target {target}{passed}"
    )

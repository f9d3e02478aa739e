"""What the model card, the security report and the console say about the dataset's privacy budget: the records'
total composed spend across runs, the store charged (and whether it is the team's), a recorded pass of the
dataset's target, a noise fitted to the remainder, and a stop by the budget (never silent)."""

from __future__ import annotations

from typing import Any


def stop_line(report: Any) -> str | None:
    """One sentence when the privacy budget stopped training before its planned steps, else None.

    ``train.epochs_completed`` counts the epoch the stop fell in when it was partial, so the line says where the
    stop fell by steps: the sample rate is 1/(batches per epoch), so the steps taken, the steps planned and the
    complete epochs follow from it (epochs alone said "6 of 6 planned epochs" for a run stopped inside its sixth)."""
    train, privacy = report.sections.get("train", {}), report.sections.get("privacy", {})
    if not train.get("stopped_by_budget"):
        return None
    steps, planned = privacy.get("steps"), train.get("epochs_planned")
    where = _stop_point(steps, privacy.get("sample_rate"), planned)
    if where is None:  # no sample rate to count steps by: the epoch it stopped in, as the loop numbers it
        where = f"in epoch {train.get('epochs_completed')} of {planned} planned"
    return (
        f"training was stopped by the privacy budget after {steps} step(s) ({where}; epsilon "
        f"{_num(privacy.get('epsilon'))} of the run's target {privacy.get('target_epsilon')}): the model is "
        "under-trained; a larger noise or fewer epochs plan a run that fits"
    )


def _stop_point(steps: Any, sample_rate: Any, epochs: Any) -> str | None:
    """Where ``steps`` fell in a run of ``epochs`` epochs at ``sample_rate`` (1/batches per epoch), or None."""
    split = _epochs_of(steps, sample_rate, epochs)
    if split is None:
        return None
    full, into, per_epoch = split
    of = f"of {per_epoch * epochs} planned step(s), {per_epoch} an epoch"
    if into == 0:
        return f"{of}: {full} of {epochs} planned epoch(s) complete, stopped before epoch {full + 1} began"
    return f"{of}: stopped {into} step(s) into epoch {full + 1} of {epochs}, {full} epoch(s) complete"


def _epochs_of(steps: Any, sample_rate: Any, epochs: Any) -> tuple[int, int, int] | None:
    """(complete epochs, steps into the next, steps an epoch) of a run stopped after ``steps``, or None."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, epochs))
    if not ints or not isinstance(sample_rate, int | float) or not 0 < sample_rate <= 1:
        return None
    per_epoch = round(1 / sample_rate)
    if abs(per_epoch * sample_rate - 1) > 1e-6 or not 0 <= steps < per_epoch * epochs:
        return None
    full, into = divmod(steps, per_epoch)
    return full, into, per_epoch


def trained_words(report: Any) -> str:
    """How much the released model trained, for the security report's at-a-glance line: a run the budget stopped
    says its complete epochs and the steps of a partial one ("2 epochs" was said of a run that trained one, counting
    the epoch the stop fell in before its first step; train/stage.py no longer records that one)."""
    train, privacy = report.sections.get("train", {}), report.sections.get("privacy", {})
    done, planned = train.get("epochs_completed"), train.get("epochs_planned")
    if not train.get("stopped_by_budget"):
        return f"{done} epoch(s)"
    steps = privacy.get("steps")
    split = _epochs_of(steps, privacy.get("sample_rate"), planned)
    if split is None:  # no sample rate to count steps by: the epoch it stopped in, as the loop numbers it
        return f"stopped by the privacy budget in epoch {done} of {planned} planned, after {steps} step(s)"
    full, into, _ = split
    part = f" and {into} step(s) of epoch {full + 1}" if into else ""
    return f"{full} complete epoch(s){part} of {planned} planned (stopped by the privacy budget after {steps} step(s))"


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

"""The block a run prints when it ends: the privacy guarantee, accuracy, the checklist's failures with their
fixes, and where the reports are. Built from report.json's content only, so what it says is what the files say.

    >>> from aisec_train.report.report import Report
    >>> r = Report(sections={"privacy": {"epsilon": 2.9961, "delta": 1e-5}, "metrics": {"clean_accuracy": 0.91}})
    >>> print(end_of_run(r, Path("run")).splitlines()[1])
      privacy    epsilon 3.00 at delta 1e-05 (rounded up)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from aisec_train.report.budget_text import stop_line
from aisec_train.report.report import Report

FILES = (("report", "report.json"), ("security", "security_report.md"), ("model card", "model_card.md"))
# Where the records' total spend across runs may sit: the dataset ledger's composed epsilon (privacy/spend.py) and
# the keys a budget store may add beside it. The first present is shown.
TOTAL_SPEND_KEYS = ("privacy.total_spend", "privacy.dataset_spend", "privacy.budget.dataset_epsilon")


def epsilon_text(eps: float) -> str:
    """Epsilon rounded UP to two decimals (never understate a privacy loss); two significant digits below 0.01."""
    if eps >= 0.01:
        return f"{math.ceil(eps * 100 - 1e-9) / 100:.2f}"
    return f"{eps:.2g}"


def _privacy(report: Report) -> list[str]:
    g = report.get
    eps = g("privacy.epsilon")
    if eps is None:
        return ["privacy    none: no differential-privacy guarantee (privacy=none)"]
    level = " client-level" if g("privacy.level") == "client" else ""
    lines = [f"privacy    epsilon {epsilon_text(eps)} at delta {g('privacy.delta'):g}{level} (rounded up)"]
    if g("privacy.guarantee.holds") is False:  # privacy/claims.py: a setting voids the accountant's figure
        gaps = "; ".join(gap.split(":")[0] for gap in g("privacy.guarantee.gaps") or [])
        lines.append(f"warning    NO DP guarantee holds ({gaps}): the epsilon above is the accountant's figure only")
    if (g("privacy.sample_rate") or 0) >= 1:
        lines.append(
            "warning    sample rate 1 (every step uses the whole training set): no privacy amplification by "
            "subsampling; a smaller batch size gives a lower epsilon at the same noise"
        )
    spend = next((g(k) for k in TOTAL_SPEND_KEYS if g(k) is not None), None)
    if isinstance(spend, dict):  # a structured total: its epsilon is the figure
        spend = spend.get("epsilon")
    shared = g("privacy.budget.records.epsilon_max")  # other datasets holding some of the same records compose too
    if isinstance(spend, (int, float)) and isinstance(shared, (int, float)):
        spend = max(spend, shared)
    if isinstance(spend, (int, float)):
        runs, target = g("privacy.budget.dataset_runs"), g("privacy.budget.dataset_target_epsilon")
        by = f" by {runs} run(s)" if runs else ""
        cap = f" (budget {epsilon_text(target)})" if target is not None else ""
        lines.append(f"records    total spend epsilon {epsilon_text(spend)}{by} on this data{cap}")
    return lines


def _accuracy(report: Report) -> str:
    clean, robust = report.get("metrics.clean_accuracy"), report.get("robustness.robust_accuracy")
    text = f"accuracy   clean {clean:.3f}" if clean is not None else "accuracy   clean n/a"
    if robust is not None:
        attack = report.get("robustness.attack") or {}
        how = (
            f" ({attack.get('name', '?')}, {attack.get('norm', '?')} eps {attack.get('eps', '?'):.4g})"
            if (isinstance(attack.get("eps"), (int, float)))
            else ""
        )
        text += f", robust {robust:.3f}{how}"
        n, of = report.get("robustness.eval_samples"), report.get("robustness.eval_of")
        sample_clean = (report.get("robustness.eval") or {}).get("clean_accuracy")
        if isinstance(n, int) and isinstance(of, int) and n < of:  # the robust figure is a sample's: say so
            on = f", clean {sample_clean:.3f} on them" if isinstance(sample_clean, (int, float)) else ""
            text += f" on a sample of {n} of {of} test samples{on}"
    return text


def _budget_stop(report: Report) -> list[str]:
    line = stop_line(report)  # the budget's own words (report/budget_text.py), also in the model card
    return [f"stopped    {line}"] if line else []


def _checklist(items: list[dict[str, Any]]) -> list[str]:
    counts = {s: sum(c["status"] == s for c in items) for s in ("pass", "fail", "not_applicable")}
    lines = [f"checklist  {counts['pass']} pass, {counts['fail']} fail, {counts['not_applicable']} not applicable"]
    for c in items:
        if c["status"] == "fail":
            lines.append(f"  FAIL {c['item']}")
            if c.get("fix"):
                lines.append(f"       fix: {c['fix']}")
    return lines


def end_of_run(report: Report, run_dir: Path) -> str:
    """The summary block, one fact per line."""
    lines = [
        *_privacy(report),
        _accuracy(report),
        *_budget_stop(report),
        *_checklist(report.checklist),
        *[f"{label:<10} {run_dir / name}" for label, name in FILES],
    ]
    return "\n".join([f"aisec-train: run finished ({run_dir})", *(f"  {line}" for line in lines)])

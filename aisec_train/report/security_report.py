"""security_report.md: the checklist answered from this run's evidence, the threat model, and the plots.

The document is written for a reviewer who has only this file and the PNGs beside it: it says what was
trained, what each status means, how every number was measured, and how to re-check the artefacts. Every
status in the threat-model table is read from what the run measured (``report.sections``); a threat the
run did not test says so instead of claiming a mitigation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aisec_train.audit import details, evidence
from aisec_train.report.budget_text import budget_section, trained_words
from aisec_train.report.report import AREAS, Report
from aisec_train.store import atomic_write

FIGURES = {  # file: caption
    "membership_roc.png": "Membership-inference ROC (log-log; the dashed line is the DP bound when DP is on).",
    "training_curve.png": "Training loss, accuracy and privacy spent per epoch.",
    "fine_pruning.png": "Backdoor repair: attack success and clean accuracy as neurons are pruned.",
    "federated_accuracy.png": "Federated training: accuracy per round.",
}
# The report key a stage sets when it draws the figure in this run. A run directory can hold an earlier run's
# figures (a resume with the backdoor or the audit off showed that run's fine_pruning.png and membership ROC under
# "no poisoning red team in this run"); a figure is shown only when this run's report names it.
DRAWN_BY = {
    "membership_roc.png": "audit.membership.roc_png",
    "training_curve.png": "train.epochs_completed",  # report/outputs.py draws it from any training history
    "fine_pruning.png": "backdoor.fine_pruning.plot",
    "federated_accuracy.png": "federated.accuracy_plot",
}


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def model_label(report: Report) -> str:
    """The model's short name: ``model.name`` if a stage set one, else the class of its ``_target_``."""
    target = report.get("model.target")
    return report.get("model.name") or (str(target).rsplit(".", 1)[-1] if target else "?")


def _check(report: Report, item: str) -> dict[str, Any] | None:
    return next((c for c in report.checklist if c["item"] == item), None)


def _status(check: dict[str, Any] | None, untested: str) -> str:
    return untested if check is None else f"{check['status']}: {check['evidence']}"


def _extraction_status(ext: dict[str, Any] | None) -> str:
    if ext and ext.get("not_applicable"):  # text inputs (aisec_train/text_run.py)
        return f"not applicable ({ext['not_applicable']})"
    if not ext:
        return "not measured (audit.enabled=false)"
    guard = ext["effects"].get("guard")
    drop = (
        f"; fidelity drop {guard['mean']:.3f} ± {guard['std']:.3f} ({guard['lowered_in']}/{guard['seeds']} seeds)"
        if guard
        else ""
    )
    return (
        f"measured: fidelity {_fmt(ext['fidelity'])} guarded after {ext['queries']} queries vs "
        f"{_fmt(ext['settings']['undefended'].get('fidelity', {}).get('mean'))} unguarded{drop}"
    )


def _targets_words(mia: dict[str, Any] | None) -> str:
    """What the membership AUC was measured on ('' if not measured): an AUC without its samples says nothing."""
    if not mia or mia.get("auc") is None:
        return f" (not applicable: {mia['not_applicable']})" if mia and mia.get("not_applicable") else ""
    lo, hi = mia["auc_ci95"]
    return (
        f" ({mia['strongest_attack']}, the strongest attack, on {mia['members']} members vs {mia['nonmembers']} "
        f"non-members; 95% CI {lo:.3f}-{hi:.3f})"
    )


def robust_sample_words(report: Report) -> str:
    """What the robust figure was measured on, as 'on N of M test samples (95% CI lo-hi)' ('' if not measured)."""
    n, of, ci = (report.get(f"robustness.{k}") for k in ("n_samples", "eval_of", "robust_accuracy_ci"))
    if report.get("robustness.robust_accuracy") is None or n is None:
        return ""
    where = f" on {n} of {of} test samples" if of is not None and n < of else f" on all {n} test samples"
    return where + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _guard_setting(report: Report, key: str) -> Any:
    """The guard's ``audit.guard.<key>`` as this run configured it: the audited policy, or the one the audit stage
    records when the audit is off (it used to name a rate limit and a budget that were set to 0, unlimited)."""
    return report.get(f"audit.extraction.guard.{key}", report.get(f"audit.guard_configured.{key}"))


def _rate_limit(report: Report) -> str:
    """The guard's rate limit as this run configured it: never named as a mitigation when it is off."""
    probed = report.get("audit.guard_probes.rate_limit") or {}
    if probed.get("configured", _guard_setting(report, "rate_limit") != 0):
        return "rate limit"
    return "no rate limit (audit.guard.rate_limit=0)"


def _guard_limits(report: Report) -> str:
    budget = _guard_setting(report, "query_budget")
    per_client = "no per-client budget (audit.guard.query_budget=0)" if budget == 0 else "per-client budget"
    return f"{per_client}, {_rate_limit(report)}"


# The defences stage_defend records in ``backdoor.stages`` (backdoor/stage.py), by the words the threat model uses.
DEFENCES = {"filtered": "filter and retrain", "fine_pruned": "Fine-Pruning", "relearned": "relearning"}


def _backdoor_words(report: Report) -> str:
    """The poisoning defences this run ran: Fine-Pruning was named after backdoor.repair=none too."""
    design = "spectral-signature / activation-clustering detection, Fine-Pruning"
    stages = report.get("backdoor.stages")
    if not isinstance(stages, (list, dict)):  # no red team in this run: the defences the pipeline has
        return design
    names = {"spectral": "spectral-signature", "activation_clustering": "activation-clustering"}
    detectors = " / ".join(names.get(m, m) for m in report.get("backdoor.detections") or {}) or "no"
    repairs = [words for stage, words in DEFENCES.items() if stage in stages]
    return f"{detectors} detection, " + (", ".join(repairs) if repairs else "no repair (backdoor.repair=none)")


def _dp_words(report: Report) -> str:
    """The DP mechanism this run trained with: never named as a mitigation of a run without one (privacy=none)."""
    if report.get("privacy.epsilon") is None:
        return "no DP (privacy=none)"
    mechanism = "client-level DP-FedAvg" if report.get("privacy.level") == "client" else "DP-SGD"
    return mechanism if report.get("privacy.guarantee.holds") is not False else f"{mechanism}, NO DP guarantee"


def _attack_words(mia: dict[str, Any] | None) -> str:
    """The membership attacks that ran, else the audit's design (loss; LiRA and RMIA with reference models)."""
    if mia and mia.get("attacks"):
        return ", ".join(mia["attacks"])
    return "loss; offline LiRA and RMIA with reference models"


def threat_model(report: Report) -> list[dict[str, str]]:
    """Rows of (stage, threat, impact, mitigation, status for this run)."""
    g = report.get
    rob = g("robustness.robust_accuracy")
    backdoor = g("backdoor.asr_before")
    mia, san = g("audit.membership"), g("audit.sanitization")
    rows = [
        (
            "data pipeline",
            "data tampering",
            "model trained on altered data",
            "manifest SHA-256 per array/file, pin refusal, lineage log",
            _status(_check(report, "data integrity verified against a pinned hash"), "not measured"),
        ),
        (
            "data pipeline",
            f"poisoning / backdoor ({g('backdoor.attack') or 'none run'})",
            "hidden trigger controls predictions",
            _backdoor_words(report),  # this run's
            f"tested: ASR {_fmt(backdoor)} -> {_fmt(g('backdoor.asr_after'))}"
            if backdoor is not None
            else "not tested in this run (backdoor.attack=none)",
        ),
        (
            "training",
            "membership inference",
            "reveals who was in the training data",
            f"{_dp_words(report)}; membership-inference audit ({_attack_words(mia)})",  # this run's
            f"measured: AUC {_fmt(mia['auc'])}, TPR {_fmt(mia['tpr_at_fpr_0_001'])} @ 0.1% FPR (strongest of "
            f"{', '.join(mia['attacks'])}: {mia['strongest_attack']}; {mia['members']} members vs "
            f"{mia['nonmembers']} non-members); epsilon {_fmt(g('privacy.epsilon'), 2)}"
            if mia and "auc" in mia
            else f"not applicable ({mia['not_applicable']})"
            if mia
            else "not measured (audit.enabled=false)",
        ),
        (
            "model",
            "evasion (adversarial examples)",
            "wrong predictions on crafted inputs",
            f"adversarial training: {g('robustness.training', 'none')}; evaluation: "
            + (f"{g('robustness.eval.suite')} suite" if g("robustness.eval.suite") else "none"),  # this run's
            f"measured: robust accuracy {_fmt(rob)}{robust_sample_words(report)} vs clean "
            f"{_fmt(g('robustness.eval.clean_accuracy', g('metrics.clean_accuracy')))} on the same samples "
            f"(adversarial training: {g('robustness.training', 'none')})"
            if rob is not None
            else "not measured",
        ),
        (
            "model",
            "evasion against input sanitisation",
            "a defence that only masks gradients",
            "BPDA adaptive attack in the evaluation",
            f"measured: {_fmt(san['robust_accuracy_plain'])} plain vs {_fmt(san['robust_accuracy_adaptive'])} adaptive"
            if san
            else "not measured",
        ),
        (
            "deployment",
            "model extraction",
            "a stolen copy of the model",
            f"output policy (label / top-k / rounding / noise), {_guard_limits(report)}",
            _extraction_status(g("audit.extraction")),
        ),
        (
            "deployment",
            "malformed / abusive queries",
            "crashes or out-of-contract inputs reach the model",
            f"guard validation (shape, dtype, finite, range), {_rate_limit(report)}",
            _status(_check(report, evidence.GUARD), "not measured"),
        ),
        (
            "deployment",
            "tampered or wrong checkpoint deployed",
            "attacker-controlled model served",
            "SHA-256 verified before loading; registry with known-good rollback",
            _status(_check(report, evidence.REGISTRY), "registered after outputs (see registry section)"),
        ),
        (
            "monitoring",
            "data drift / out-of-distribution inputs",
            "silent accuracy loss in production",
            "baseline statistics + aisec-train-monitor (exit 1 on alarm)",
            _status(_check(report, evidence.DRIFT), "not measured"),
        ),
    ]
    keys = ("stage", "threat", "impact", "mitigation", "status")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def threat_model_markdown(report: Report) -> list[str]:
    lines = ["| stage | threat | impact | mitigation | status for this run |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['stage']} | {r['threat']} | {r['impact']} | {r['mitigation']} | {r['status']} |"
        for r in threat_model(report)
    ]
    return lines


def _at_a_glance(report: Report) -> list[str]:
    g = report.get
    eps = g("privacy.epsilon")
    privacy = (
        f"({eps:.2f}, {g('privacy.delta'):g})-DP, {g('privacy.accountant')} accountant, noise "
        f"{_fmt(g('privacy.noise_multiplier'), 2)}, {g('privacy.steps')} steps"
        if eps is not None
        else "none (no DP guarantee)"
    )
    if eps is not None and g("privacy.guarantee.holds") is False:  # privacy/claims.py
        privacy = f"NO DP guarantee ({'; '.join(g('privacy.guarantee.gaps'))}); accountant: {privacy}"
    rows = [
        (
            "dataset",
            f"{g('data.name')}: {g('data.n_train')} train / {g('data.n_test')} held-out, shape {g('data.shape')}",
        ),
        ("model", f"{model_label(report)} (`{g('model.target')}`), `model.pt` SHA-256 `{g('model.sha256')}`"),
        ("training", f"{_training_words(report)} on {_fmt(g('train.device'))}; privacy: {privacy}"),
        ("clean accuracy", _fmt(g("metrics.clean_accuracy"))),
        ("robust accuracy", _fmt(g("robustness.robust_accuracy")) + robust_sample_words(report)),
        ("membership AUC", _fmt(g("audit.membership.auc")) + _targets_words(g("audit.membership"))),
        ("extraction fidelity (guarded)", _fmt(g("audit.extraction.fidelity"))),
        ("registry", f"`{g('registry.id')}` in `{g('registry.path')}`"),
    ]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _training_words(report: Report) -> str:
    """How much the model trained: a federated run's rounds (its ``train.epochs_completed`` is the last round, and
    its clients' local epochs are federated.local_epochs), else epochs, a budget stop's by its steps."""
    fed = report.get("federated")
    if report.get("train.trainer") == "federated" and isinstance(fed, dict):
        return (
            f"{fed.get('rounds')} of {fed.get('rounds_planned')} planned federated round(s) of "
            f"{fed.get('local_epochs')} local epoch(s) on {fed.get('clients')} clients"
        )
    return trained_words(report)


def security_report(report: Report, figures: list[str]) -> str:
    g = report.get
    counts = {a: {s: 0 for s in ("pass", "fail", "not_applicable")} for a in AREAS}
    for c in report.checklist:
        counts[c["area"]][c["status"]] += 1
    lines = [
        f"# Security report: {model_label(report)} on {g('data.name', '?')}",
        "",
        f"Run `{g('run.experiment')}` of aisec-train. Every status below was decided by a measurement made in this "
        "run: **pass** means the measured evidence meets the item, **fail** means it does not (or nothing was "
        "verified), **not_applicable** means the run did not exercise that control. The numbers are in "
        "report.json beside this file; the threat model maps each threat to its mitigation and this run's result.",
        "",
        "## At a glance",
        "",
        *_at_a_glance(report),
        "",
        *budget_section(report),  # the records' total spend, the store charged, a budget stop (report/budget_text)
        "| area | pass | fail | not applicable |",
        "|---|---|---|---|",
        *[f"| {a} | {c['pass']} | {c['fail']} | {c['not_applicable']} |" for a, c in counts.items()],
        "",
        "## Checklist (evidence measured in this run)",
    ]
    for area in AREAS:
        items = [c for c in report.checklist if c["area"] == area]
        lines += ["", f"### {area}"]
        lines += [_item_line(c) for c in items] or ["- no item answered"]
    lines += ["", "## Threat model", "", *threat_model_markdown(report), ""]
    lines += ["## How each audit was measured", "", "### Membership inference", ""]
    lines += [*details.membership(g("audit.membership")), ""]
    lines += ["### Model extraction and the guarded query interface", ""]
    lines += [*details.extraction(g("audit.extraction"), g("audit.sanitization")), ""]
    lines += ["### Guard refusals", "", *details.guard_probes(g("audit.guard_probes")), ""]
    lines += ["### Monitoring", "", *details.monitoring(g("monitoring")), ""]
    gov = g("governance") or {}
    if gov:
        lines += ["## Governance", "", *[f"- {k}: {v}" for k, v in gov.items()], ""]
    lines += [
        "## Re-check the artefacts",
        "",
        "- `sha256sum model.pt` must print the SHA-256 above (the loader refuses any other file).",
        f"- `aisec-train-registry --registry {g('registry.path', 'REGISTRY')} list` shows this run; `mark-good "
        f"{g('registry.id', 'RUN_ID')}` keeps a verified copy and `rollback --dest model.pt` restores it.",
        "- `aisec-train-monitor . new_batch.npz` checks production inputs against this run's baseline.",
        "",
        "## Figures",
        "",
    ]
    for name in figures:
        lines += [f"![{name}]({name})", "", f"*{FIGURES.get(name, name)}*", ""]
    return "\n".join(lines)


def _item_line(c: dict[str, Any]) -> str:
    """One checklist item: its status, evidence, the criterion the status was judged by, and a fail's fix."""
    line = f"- **{c['status']}** {c['item']}: {c['evidence']}"
    if c.get("criterion"):
        line += f"  \n  *criterion:* {c['criterion']}"
    if c.get("fix"):
        line += f"  \n  *fix:* {c['fix']}"
    return line


def drawn_figures(report: Report, run_dir: Path) -> list[str]:
    """The figures this run drew (its report names them), not another run's left in the same folder."""
    return [name for name in FIGURES if report.get(DRAWN_BY[name]) and (run_dir / name).exists()]


def write(report: Report, run_dir: Path) -> Path:
    path = run_dir / "security_report.md"
    atomic_write(path, security_report(report, drawn_figures(report, run_dir)), root=run_dir)
    return path

"""security_report.md: the checklist answered from this run's evidence, the threat model, and the plots.

Every status in the threat-model table is read from what the run measured (``report.sections``); a threat
the run did not test says so instead of claiming a mitigation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aisec_train.report.report import AREAS, Report


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _check(report: Report, item: str) -> dict[str, Any] | None:
    return next((c for c in report.checklist if c["item"] == item), None)


def _status(check: dict[str, Any] | None, untested: str) -> str:
    return untested if check is None else f"{check['status']}: {check['evidence']}"


def threat_model(report: Report) -> list[dict[str, str]]:
    """Rows of (stage, threat, impact, mitigation, status for this run)."""
    g = report.get
    rob = g("robustness.robust_accuracy")
    backdoor = g("backdoor.asr_before")
    mia, ext, san = g("audit.membership"), g("audit.extraction"), g("audit.sanitization")
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
            "poisoning / backdoor (BadNets)",
            "hidden trigger controls predictions",
            "spectral-signature / activation-clustering detection, Fine-Pruning",
            f"tested: ASR {_fmt(backdoor)} -> {_fmt(g('backdoor.asr_after'))}"
            if backdoor is not None
            else "not tested in this run (backdoor.attack=none)",
        ),
        (
            "training",
            "membership inference",
            "reveals who was in the training data",
            "DP-SGD; loss + offline LiRA audit",
            f"measured: AUC {_fmt(mia['auc'])}, TPR {_fmt(mia['tpr_at_fpr_0_001'])} @ 0.1% FPR; epsilon "
            f"{_fmt(g('privacy.epsilon'), 2)}"
            if mia
            else "not measured (audit.enabled=false)",
        ),
        (
            "model",
            "evasion (adversarial examples)",
            "wrong predictions on crafted inputs",
            "PGD / FGSM-RS adversarial training; PGD evaluation",
            f"measured: robust accuracy {_fmt(rob)} vs clean {_fmt(g('metrics.clean_accuracy'))} "
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
            "output policy (label / top-k / rounding / noise), per-client budget and rate limit",
            f"measured: fidelity {_fmt(ext['fidelity'])} guarded after {ext['queries']} queries vs "
            f"{_fmt((ext.get('full_probs_same_queries') or {}).get('fidelity'))} with full probabilities"
            if ext
            else "not measured",
        ),
        (
            "deployment",
            "malformed / abusive queries",
            "crashes or out-of-contract inputs reach the model",
            "guard validation (shape, dtype, finite, range), rate limit",
            _status(_check(report, "guarded query interface refuses malformed and over-rate queries"), "not measured"),
        ),
        (
            "deployment",
            "tampered or wrong checkpoint deployed",
            "attacker-controlled model served",
            "SHA-256 verified before loading; registry with known-good rollback",
            _status(
                _check(report, "checkpoint registered in the model inventory (known-good registry with rollback)"),
                "registered after outputs (see registry section)",
            ),
        ),
        (
            "monitoring",
            "data drift / out-of-distribution inputs",
            "silent accuracy loss in production",
            "baseline statistics + aisec-train-monitor (exit 1 on alarm)",
            _status(_check(report, "drift check separates a shifted batch from a clean one"), "not measured"),
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


def security_report(report: Report, figures: list[str]) -> str:
    g = report.get
    counts = {s: sum(c["status"] == s for c in report.checklist) for s in ("pass", "fail", "not_applicable")}
    lines = [
        f"# Security report: {g('model.name', '?')} on {g('data.name', '?')}",
        "",
        f"Checklist: {counts['pass']} pass, {counts['fail']} fail, {counts['not_applicable']} not applicable. "
        f"Model SHA-256 `{g('model.sha256')}`, data manifest `{g('data.manifest_sha256')}`.",
        f"Clean accuracy {_fmt(g('metrics.clean_accuracy'))}; privacy epsilon {_fmt(g('privacy.epsilon'), 2)}.",
        "",
        "## Checklist (evidence measured in this run)",
    ]
    for area in AREAS:
        items = [c for c in report.checklist if c["area"] == area]
        lines += ["", f"### {area}"]
        lines += [f"- **{c['status']}** {c['item']}: {c['evidence']}" for c in items] or ["- no item answered"]
    lines += ["", "## Threat model", "", *threat_model_markdown(report), ""]
    gov = g("governance") or {}
    if gov:
        lines += ["## Governance", *[f"- {k}: {v}" for k, v in gov.items()], ""]
    lines += ["## Figures", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(lines)


def write(report: Report, run_dir: Path) -> Path:
    figures = [name for name in ("membership_roc.png", "training_curve.png") if (run_dir / name).exists()]
    path = run_dir / "security_report.md"
    path.write_text(security_report(report, figures))
    return path

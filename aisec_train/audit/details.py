"""Markdown sections of security_report.md that show how each audit was measured (tables, not prose).

Each function takes the report's section as written to report.json and returns lines; a missing section
gives a line saying the audit did not run, never an empty table.
"""

from __future__ import annotations

from typing import Any


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pm(stats: dict[str, Any] | None) -> str:
    return "n/a" if not stats else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def membership(m: dict[str, Any] | None) -> list[str]:
    if m and m.get("not_applicable"):  # too few targets (audit/stage.py): the reason, not a figure
        return [f"Not applicable: {m['not_applicable']}."]
    if not m:
        return ["Not run (audit.enabled=false)."]
    # Describe only the attacks that ran: without reference models there is no LiRA and no RMIA.
    attacks = "The loss attack thresholds the per-sample loss" + (
        f"; offline LiRA compares each target's logit-scaled confidence with {m['reference_models']} reference "
        "model(s) that never saw it, fresh from the run's model factory and trained like the audited model (same "
        "objective, optimizer, augmentation, sample rate and noise); offline RMIA compares the same models' "
        "likelihood ratios with population samples"
        if m.get("reference_models")
        else " (audit.membership.reference_models=0: no reference models, so neither offline LiRA nor RMIA ran)"
    )
    lines = [
        f"Targets: {m['members']} members drawn from the training split and {m['nonmembers']} non-members from the "
        f"held-out split (FPR resolution {m['fpr_resolution']:.4f}: a TPR at 0.1% FPR below that resolution is "
        f"read at the lowest measurable FPR). {attacks}.",
        "",
        "| attack | AUC | 95% CI (bootstrap) | TPR @ 0.1% FPR | TPR @ 1% FPR |",
        "|---|---|---|---|---|",
    ]
    for name, a in m["attacks"].items():
        lo, hi = a["auc_ci95"]
        tpr = f"{a['tpr_at_fpr_0_001']:.3f} | {a['tpr_at_fpr_0_01']:.3f}"
        lines.append(f"| {name} | {a['auc']:.3f} | {lo:.3f}-{hi:.3f} | {tpr} |")
    if m.get("reference_models"):
        lines += [
            "",
            f"Reference models: {m['reference_models']} x `{m.get('reference_model', '?')}`, "
            f"{m['reference_epochs']} epochs"
            + (f" (at most the audited run's {m['reference_max_steps']} steps)" if m.get("reference_max_steps") else "")
            + f" on {m['reference_train_size']} samples, batch "
            f"{m['reference_batch_size']}, objective `{m.get('reference_objective', '?')}`, optimizer "
            f"`{m.get('reference_optimizer', '?')}`, noise multiplier {_f(m.get('reference_noise_multiplier'))}.",
        ]
    bound = m.get("dp_bound")
    if bound:
        first = next(iter(bound["attacks"].values()), {})
        level = first.get("correction", "95% Clopper-Pearson")
        lines += ["", f"DP consistency (TPR <= e^eps FPR + delta; significance: {level}):", ""]
        for name, c in bound["attacks"].items():
            tested = c.get("thresholds_tested", c["pairs"])
            lines.append(
                f"- {name}: {c['raw_violations']} raw violation(s) over {c['pairs']} ROC thresholds, "
                f"{c['significant_violations']} significant over the {tested} tested; empirical epsilon lower bound "
                f"{c['empirical_epsilon_lower_bound']:.2f} vs epsilon {c['epsilon']:.2f}: "
                f"{'respected' if c['respected'] else 'VIOLATED'}"
            )
    return lines


def extraction(e: dict[str, Any] | None, s: dict[str, Any] | None) -> list[str]:
    if e and e.get("not_applicable"):  # text inputs (aisec_train/text_run.py): the reason, not a figure
        return [f"Not applicable: {e['not_applicable']}."]
    if not e:
        return ["Not run (audit.enabled=false)."]
    g = e["guard"]
    lines = [
        f"An attacker with {e['planned_queries']} planned queries ({e['attacker_data']}) trains a surrogate of the "
        "same architecture (a fresh model from the run's model factory, trained by the one training loop) on what "
        f"the interface releases. The guard releases `{g['output']}` outputs with a "
        f"budget of {g['query_budget'] or 'no'} queries per client. Each setting ran for {len(e['seeds'])} paired "
        "attacker seeds (same queries, same surrogate initialisation across settings); figures are mean ± std.",
        "",
        "| interface | queries answered | fidelity (agreement with the model) | surrogate accuracy |",
        "|---|---|---|---|",
    ]
    labels = {
        "undefended": "full probabilities, no budget",
        "output_policy_only": f"`{g['output']}` only, no budget",
        "full_probs_same_queries": "full probabilities, cut at the guard's query count",
        "guarded": "the guard (policy + budget)",
    }
    for name, label in labels.items():
        row = e["settings"][name]
        lines.append(
            f"| {label} | {row['queries']} | {_pm(row.get('fidelity'))} | {_pm(row.get('surrogate_accuracy'))} |"
        )
    lines += ["", "| defence | fidelity drop (mean ± std) | lowered in |", "|---|---|---|"]
    for name, eff in e["effects"].items():
        lines.append(f"| {name.replace('_', ' ')} | {_pm(eff)} | {eff['lowered_in']}/{eff['seeds']} seeds |")
    if e.get("refusal"):
        lines += ["", f"The guard's refusal that stopped the attacker: `{e['refusal']}`"]
    if s:
        san, atk = s["sanitizer"], s["attack"]
        lines += [
            "",
            f"Input sanitisation (bit depth {san['bit_depth']}, median {san['smoothing'] or 'off'}) under "
            f"PGD-{atk['steps']} ({atk['norm']}, eps {atk['eps']}) on {s['n_samples']} held-out samples:",
            "",
            "| model | clean accuracy | robust accuracy |",
            "|---|---|---|",
            f"| undefended | {_f(s['clean_accuracy_undefended'])} | {_f(s['robust_accuracy_undefended'])} |",
            f"| sanitised, plain PGD (gradient masking) | {_f(s['clean_accuracy_sanitized'])} | "
            f"{_f(s['robust_accuracy_plain'])} |",
            f"| sanitised, adaptive BPDA-PGD (the claim) | {_f(s['clean_accuracy_sanitized'])} | "
            f"{_f(s['robust_accuracy_adaptive'])} |",
        ]
    return lines


def guard_probes(p: dict[str, Any] | None) -> list[str]:
    if p and p.get("not_applicable"):
        return [f"Not applicable: {p['not_applicable']}."]
    if not p:
        return ["Not run (audit.enabled=false)."]
    lines = [f"{p['malformed_refused']}/{p['malformed_sent']} malformed queries refused, each with one line:", ""]
    lines += [f"- {name}: `{msg}`" if msg else f"- {name}: **answered**" for name, msg in p["refusals"].items()]
    return lines


def monitoring(m: dict[str, Any] | None) -> list[str]:
    if m and m.get("not_applicable"):
        return [f"Not applicable: {m['not_applicable']}."]
    if not m:
        return ["No monitoring baseline in this run."]
    th = m["thresholds"]
    lines = [
        f"Baseline `{m['baseline']}` (SHA-256 `{m['baseline_sha256'][:16]}...`) holds per-feature statistics of "
        f"{m['n_train']} training inputs and the confidence of held-out data (mean {m['confidence']['mean']:.3f}). "
        f"An alarm is a drift score above {th['drift']} or a confidence drop with z below -{th['confidence']}. "
        "Self-check on held-out inputs the baseline never saw:",
        "",
        "| batch | n | drift score | confidence z | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, v in m["self_check"].items():
        verdict = "ALARM" if v["alarm"] else "ok"
        lines.append(f"| {name} | {v['n']} | {v['drift_score']:.2f} | {v['confidence_z']:+.2f} | {verdict} |")
    lines += ["", "Check a new batch: `aisec-train-monitor RUN_DIR batch.npz` (exit 0 ok, 1 alarm, 2 refused input)."]
    return lines

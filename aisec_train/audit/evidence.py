"""Checklist answers from measured audit results: a status and one sentence of evidence with the numbers.

Each function reads only what the audit measured (the report's ``audit`` and ``monitoring`` sections), so a
status can always be traced to a number in report.json.
"""

from __future__ import annotations

import math
from typing import Any

from aisec_train.audit.significance import dp_level
from aisec_train.report.report import Status

MEMBERSHIP = "membership-inference audit"
EXTRACTION = "model-extraction test"
SANITIZATION = "input sanitisation evaluated under an adaptive attack"
GUARD = "guarded query interface refuses malformed and over-rate queries"
DRIFT = "drift check flags shifted batches (noise, rotation, occlusion) and not a clean one"
REGISTRY = "checkpoint registered in the model inventory (known-good registry with rollback)"


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pm(stats: dict[str, Any] | None) -> str:
    return "n/a" if not stats else f"{stats['mean']:.3f} +/- {stats['std']:.3f}"


def _seeds(effect: dict[str, Any]) -> str:
    """How many seeds the defence helped in, and whether that is more than seed-to-seed noise."""
    if effect["seeds"] < 2:  # one seed has no spread: nothing says the effect is larger than seed-to-seed noise
        return f"lowered in {effect['lowered_in']}/{effect['seeds']} seed, spread not measured (one seed)"
    resolved = effect["lowered_in"] == effect["seeds"] and effect["mean"] > effect["std"]
    return (
        f"lowered in {effect['lowered_in']}/{effect['seeds']} seeds, {'resolved' if resolved else 'within seed noise'}"
    )


def membership(summary: dict[str, Any], eps: float | None, delta: float, max_auc: float) -> tuple[Status, str]:
    lo, hi = summary["auc_ci95"]
    numbers = (
        f"AUC {summary['auc']:.3f} (95% bootstrap CI {lo:.3f}-{hi:.3f}), TPR {summary['tpr_at_fpr_0_001']:.3f} at "
        f"0.1% FPR and {summary['tpr_at_fpr_0_01']:.3f} at 1% FPR by the strongest attack, {summary['auc_attack']} (of "
        f"{', '.join(summary['attacks'])}; {summary['members']} members vs {summary['nonmembers']} non-members, "
        f"{summary['reference_models']} reference model(s); FPR resolution {summary['fpr_resolution']:.4f})"
    )
    if eps is None:
        # The pass is a claim that the AUC is at most max_auc: the interval's upper end must be, not the point.
        if max(hi, summary["auc"]) <= max_auc:
            return "pass", f"{numbers}; no DP guarantee, pass requires the AUC's 95% CI upper bound <= {max_auc}"
        if auc_untestable(summary, max_auc):
            return "fail", (
                f"{numbers}; NOT TESTED: too few targets to show AUC <= {max_auc}: the point estimate is below it but "
                f"the 95% CI's upper bound {hi:.3f} is not (about {targets_to_show_auc(summary, max_auc)} members "
                "and as many non-members would narrow it below, the CI's half-width shrinking as 1/sqrt(n), at this "
                "AUC)"
            )
        return "fail", f"{numbers}; no DP guarantee, pass requires the AUC's 95% CI upper bound <= {max_auc}"
    bound = summary["dp_bound"]
    checks = bound["attacks"].values()
    lb = max(c["empirical_epsilon_lower_bound"] for c in checks)
    text = (
        f"{numbers}; measured pairs {'respect' if bound['respected'] else 'VIOLATE'} TPR <= e^{eps:.2f} FPR + "
        f"{delta:g} ({_level_words(bound)}); empirical epsilon lower bound {lb:.2f}"
    )
    if untestable(summary):
        # Too few targets for this epsilon: even a perfect attack would respect the bound, so "respected" verified
        # nothing, and a pass would claim what was not measured (the report's "fail": nothing was verified).
        most = max(c.get("max_refutable_epsilon", 0.0) for c in checks)
        attacks = max(c.get("attacks_corrected", 1) for c in checks)
        return "fail", (
            f"{numbers}; NOT TESTED: too few targets to test epsilon {eps:.2f}: even a perfect attack on "
            f"{summary['members']} members vs {summary['nonmembers']} non-members would respect TPR <= e^eps FPR + "
            f"{delta:g} ({_level_words(bound)}; these targets can refute epsilon up to {most:.2f} only; epsilon "
            f"{eps:.2f} needs about {targets_to_refute(eps, delta, attacks)} members and as many non-members)"
        )
    return ("pass" if bound["respected"] else "fail"), text


def _level_words(bound: dict[str, Any]) -> str:
    """The DP-bound check's level as the report states it (a report from before the correction: 95% per pair)."""
    words = {c.get("correction") for c in bound["attacks"].values()}
    if None in words or len(words) != 1:
        return "95% Clopper-Pearson"
    return str(words.pop())


# The fix a "fail" for too few targets gets instead of the item's default ("train with DP", which it already does).
TOO_FEW_TARGETS_FIX = (
    "more membership targets: a larger held-out split (dataset.test_fraction, or dataset.test_path) raises the cap on "
    "audit.membership.targets; or, under DP, a claim these targets can test (a smaller privacy.target_epsilon)"
)


def targets_to_refute(eps: float, delta: float, attacks: int = 3) -> int:
    """The fewest members (and as many non-members) whose perfect attack refutes ``eps`` at the DP-bound check's
    family-wise level (:func:`aisec_train.audit.significance.dp_level`, Bonferroni over ``attacks`` x its thresholds):
    ``q - delta > e^eps (1 - q)`` with ``q = (level / 2)^(1/n)``, so ``n ~ 7 e^eps`` at 3 attacks (144 at
    epsilon 3, ~22,500 at epsilon 8; ``n ~ 3.7 e^eps`` before the correction)."""

    def refutes(n: int) -> bool:
        q = (dp_level(n, attacks) / 2) ** (1 / n)
        return q - delta > math.exp(eps) * (1 - q)

    high = 1
    while not refutes(high) and high < 10**12:
        high *= 2
    low = high // 2  # refutes(low) is false (or low is 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if refutes(mid) else (mid, high)
    return high


def auc_untestable(summary: dict[str, Any], max_auc: float | None = None) -> bool:
    """A non-private run whose AUC is below ``max_auc`` but whose 95% CI reaches above it: the targets were too
    few to show the AUC is at most ``max_auc`` (the summary's own ``max_auc`` when none is given)."""
    max_auc = summary.get("max_auc") if max_auc is None else max_auc
    if max_auc is None or summary.get("dp_bound") or summary.get("auc") is None:
        return False
    return summary["auc"] < max_auc < summary["auc_ci95"][1]


def targets_to_show_auc(summary: dict[str, Any], max_auc: float) -> int:
    """Members (and as many non-members) whose 95% CI upper bound would reach ``max_auc`` at the measured AUC:
    the upper half-width ``hi - auc`` shrinks as 1/sqrt(n), so ``n = m ((hi - auc) / (max_auc - auc))^2``."""
    m, auc, hi = summary["members"], summary["auc"], summary["auc_ci95"][1]
    return max(m + 1, math.ceil(m * ((hi - auc) / (max_auc - auc)) ** 2 - 1e-9))


def untestable(summary: dict[str, Any]) -> bool:
    """Targets too few for the item's claim: a DP run whose targets could not refute its epsilon with any attack
    (no violation, and none was possible), or a non-private run whose AUC's CI reaches above ``max_auc`` while
    the point estimate is below it (:func:`auc_untestable`)."""
    bound = summary.get("dp_bound")
    if not bound:
        return auc_untestable(summary)
    if not bound["respected"]:
        return False
    return not any(c.get("can_refute", True) for c in bound["attacks"].values())


def extraction(summary: dict[str, Any]) -> tuple[Status, str]:
    """Pass when the guard lowered the surrogate's fidelity in every seed; the text says which defence did it."""
    settings, effects = summary["settings"], summary["effects"]
    guard = summary["guard"]
    n, seeds = summary["queries"], len(summary["seeds"])
    total = effects.get("guard")
    policy_eq = effects.get("output_policy_at_equal_queries")
    budget = effects.get("budget")
    ok = bool(total) and total["lowered_in"] == total["seeds"] and total["mean"] > 0
    parts = [
        f"guard (output {guard['output']}, budget {guard['query_budget'] or 'none'}) answered {n} of "
        f"{summary['planned_queries']} planned queries (stopped by guard: {summary['stopped_by_guard']}); "
        f"fidelity over {seeds} paired attacker seeds: guarded {_pm(settings['guarded'].get('fidelity'))}, "
        f"full probabilities at the same {n} queries {_pm(settings['full_probs_same_queries'].get('fidelity'))}, "
        f"unguarded with all {summary['planned_queries']} {_pm(settings['undefended'].get('fidelity'))}"
    ]
    if total:
        parts.append(f"the guard lowered fidelity by {_pm(total)} ({_seeds(total)})")
    if policy_eq and budget and settings["full_probs_same_queries"]["queries"] < summary["planned_queries"]:
        larger = "budget" if budget["mean"] > policy_eq["mean"] else "output policy"
        parts.append(
            f"of which the output policy at equal queries {_pm(policy_eq)} ({_seeds(policy_eq)}) and the budget "
            f"alone {_pm(budget)} ({_seeds(budget)}): most of the drop came from the {larger}"
        )
    elif policy_eq:
        parts.append(f"the budget did not bind; the output policy alone {_pm(policy_eq)} ({_seeds(policy_eq)})")
    return ("pass" if ok else "fail"), "; ".join(parts)


def sanitization(sanit: dict[str, Any]) -> tuple[Status, str]:
    """Pass means the evaluation was honest (the adaptive attack is at least as strong as plain PGD) and the
    sanitiser helped under it: robust accuracy above the undefended model's. A sanitiser that lowers it fails."""
    adaptive = sanit["robust_accuracy_adaptive"]
    honest = adaptive <= sanit["robust_accuracy_plain"]
    helped = adaptive > sanit["robust_accuracy_undefended"]
    s = sanit["sanitizer"]
    verdict = "" if helped else "; the sanitiser did not raise robust accuracy under the adaptive attack"
    return ("pass" if honest and helped else "fail"), (
        f"bit depth {s['bit_depth']}, median {s['smoothing'] or 'off'}: robust accuracy "
        f"{sanit['robust_accuracy_plain']:.3f} under plain PGD (gradient masking) but "
        f"{sanit['robust_accuracy_adaptive']:.3f} under BPDA-PGD vs {sanit['robust_accuracy_undefended']:.3f} "
        f"undefended (clean {sanit['clean_accuracy_sanitized']:.3f} / {sanit['clean_accuracy_undefended']:.3f}); "
        "only the adaptive figure is claimed" + verdict
    )


# The fix a guard without a rate limit gets instead of the item's default (a bug report against the guard's code).
NO_RATE_LIMIT_FIX = (
    "give the guard a rate limit: audit.guard.rate_limit=Q (sustained queries/s per client) and audit.guard.burst=B "
    "(the token bucket's size); 0 leaves over-rate queries answered"
)


def guard(probes: dict[str, Any], budget_refusal: str | None) -> tuple[Status, str]:
    """The item claims over-rate queries are refused: it passes only when this guard has a rate limit
    (``audit.guard.rate_limit`` > 0) and the probe found it refusing beyond the burst and answering after a refill."""
    sent, refused = probes["malformed_sent"], probes["malformed_refused"]
    rate = probes["rate_limit"]
    configured = rate.get("configured", True)  # a report from before the flag probed a fixed limit
    ok = refused == sent and probes["valid_query_answered"] and probes["rate_limit_refused_burst"]
    ok = ok and probes["rate_limit_recovered"] and configured

    def was(flag: bool) -> str:
        return "was" if flag else "was NOT"

    own = rate.get("configured_burst")
    probed = f" (probed at {rate['burst']} of its burst of {own})" if own not in (None, rate["burst"]) else ""
    limit = (
        f"at the guard's rate limit of {rate['queries_per_s']:g} queries/s with burst {rate['burst']}{probed}"
        if configured
        else "this guard has NO rate limit (audit.guard.rate_limit=0: over-rate queries are answered); the "
        f"mechanism alone, probed at {rate['queries_per_s']:g} queries/s with burst {rate['burst']}"
    )
    return ("pass" if ok else "fail"), (
        f"{refused}/{sent} malformed queries refused ({', '.join(probes['refusals'])}); a valid query "
        f"{was(probes['valid_query_answered'])} answered; {limit}: a query beyond the burst "
        f"{was(probes['rate_limit_refused_burst'])} refused and one after the refill "
        f"{was(probes['rate_limit_recovered'])} answered; the extraction attacker's budget "
        f"refusal: {budget_refusal or 'none (budget did not bind)'}"
    )


def drift(verdicts: dict[str, Any], threshold: float) -> tuple[Status, str]:
    clean = {k: v for k, v in verdicts.items() if k.startswith("clean")}
    shifted = {k: v for k, v in verdicts.items() if not k.startswith("clean")}
    ok = not any(v.alarm for v in clean.values()) and all(v.alarm for v in shifted.values())

    def say(name: str, v: Any) -> str:
        return (
            f"{name} (n={v.n}): {'ALARM' if v.alarm else 'ok'}, drift {v.drift_score:.2f}, conf z {v.confidence_z:+.1f}"
        )

    return ("pass" if ok else "fail"), (
        "; ".join(say(k, v) for k, v in verdicts.items())
        + f" (drift threshold {threshold}); command: aisec-train-monitor RUN_DIR batch.npz"
    )

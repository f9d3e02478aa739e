"""The evaluation stages of the pipeline: ``evaluate`` (clean accuracy on the test split) and ``robustness``
(the evasion suite and the gradient-masking check).

    evaluate:   accuracy on the whole test split, streamed -> ``metrics``
    robustness: a seeded, class-stratified sample (robust/sampling.py) -> robustness.eval suite (APGD-CE +
                APGD-T, AutoAttack's standard ensemble, or PGD-20; robust/evaluation.py) -> ``robustness``,
                the evasion and masking checklist items (token ids: not applicable, text_run.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aisec_train.text_run import ROBUSTNESS_ITEMS, is_text, skip_robustness
from aisec_train.train.distributed import weights_digest
from aisec_train.train.loop import check_outputs_finite, evaluate

if TYPE_CHECKING:
    from aisec_train.run_state import Run

EVASION, MASKING = (item for _, item in ROBUSTNESS_ITEMS)


def stage_evaluate(run: Run) -> None:
    """Clean accuracy on the test split; a model whose outputs are not finite on most of it is refused before any
    later stage works on it or ``save_model`` releases it (its weights alone can be finite)."""
    assert run.model is not None and run.data is not None
    if run.test_pass is not None and run.test_pass[0] == weights_digest(run.model):
        _, clean, non_finite = run.test_pass  # the weights the train stage measured (and checked): no second pass
    else:  # the backdoor defence pruned or retrained them
        clean, non_finite = evaluate(run.model, run.data.test, run.device, workers=run.cfg.dataset.workers)
        check_outputs_finite(non_finite, len(run.data.test), run.cfg.train.lr)
    run.report.add("metrics", clean_accuracy=clean, n_test=len(run.data.test), non_finite_test_outputs=non_finite)


def stage_robustness(run: Run) -> None:
    """The evaluation suite (robustness.eval): APGD-CE + APGD-T by default, AutoAttack's standard ensemble, or
    PGD-20; a sample counts as robust only if every attack fails; gradient masking is checked, not assumed."""
    from aisec_train.robust.evaluation import evaluate_robustness
    from aisec_train.robust.sampling import evaluation_sample

    rob = run.cfg.robustness
    if is_text(run.data):
        skip_robustness(run)
        return
    if not rob.evaluate:
        run.report.add("robustness", robust_accuracy=None, attack=None, eval=None, training=rob.mode.value)
        for item in (EVASION, MASKING):
            run.report.check("model", item, "not_applicable", "robustness.evaluate=false")
        return
    assert run.model is not None and run.data is not None
    # a seeded, class-stratified sample of robustness.eval_samples (all: the whole split); its CI is reported
    x, y = evaluation_sample(run.data.test, rob.eval_samples, seed=run.cfg.train.seed)
    a = rob.attack
    result = evaluate_robustness(
        run.model, x.to(run.device), y.to(run.device), suite=rob.eval, norm=a.norm.value, eps=a.eps,
        seed=run.cfg.train.seed, backend=rob.backend, pgd_steps=a.steps, pgd_restarts=a.restarts,
        pgd_step_size=a.step_size,
    )  # fmt: skip
    per_attack = {name: entry for name, entry in result["attacks"].items()}
    evaluation = {k: v for k, v in result.items() if k not in ("attacks", "attack")} | per_attack
    run.report.add(
        "robustness",
        robust_accuracy=result["robust_accuracy"],
        robust_accuracy_ci=result["robust_accuracy_ci"],
        attack=result["attack"],
        eval=evaluation,
        n_samples=len(x),
        eval_samples=len(x),
        eval_of=len(run.data.test),
        training=rob.mode.value,
    )
    clean = result["clean_accuracy"]  # on the attacked samples, as the robust figure and its interval are
    figures = ", ".join(
        f"{name} {e['robust_accuracy']:.3f}" if "robust_accuracy" in e else f"{name} skipped ({e['skipped']})"
        for name, e in per_attack.items()
    )
    completed = any("robust_accuracy" in e for e in per_attack.values())  # the criterion: an attack measured it
    attacked = round(clean * len(x))  # the clean-correct samples: the only ones an attack runs on
    evidence = (
        f"{rob.eval} suite ({a.norm.value}, eps {a.eps:.4g}) on {_sample_words(len(x), len(run.data.test))}: "
        "robust accuracy "
        f"{result['robust_accuracy']:.3f} (95% CI {result['robust_accuracy_ci'][0]:.3f}-"
        f"{result['robust_accuracy_ci'][1]:.3f}) vs clean {clean:.3f} on the same samples ({attacked} attacked); "
        f"after each attack (cascade): {figures}"
    )
    if not attacked:  # no sample was classified correctly: no attack ran on anything
        run.report.check("model", EVASION, "fail", evidence, fix=NOTHING_ATTACKED)
    else:
        run.report.check("model", EVASION, "pass" if completed else "fail", evidence)
    status, masking_evidence, fix = masking_verdict(result["gradient_masking"], attacked)
    run.report.check("model", MASKING, status, masking_evidence, fix=fix)


NOTHING_ATTACKED = (
    "no sample of the evaluation was classified correctly, so no attack or check had an input to work on: "
    "evaluate more of the test split (aisec-train robustness.eval_samples=all) or train a model that classifies some"
)


def masking_verdict(masking: dict, attacked: int) -> tuple[str, str, str | None]:
    """(status, evidence, fix) of the gradient-masking item from the checks that actually ran: a pass needs the
    black-box Square check, a more-steps comparison (fewer steps than the full attack) and the zero-gradient check,
    each on at least one sample; a check that did not run is named, never claimed."""
    if masking["flagged"]:
        return "fail", "; ".join(masking["reasons"]), None
    checks = masking["checks"]
    if not attacked:
        return "fail", "no clean-correct sample in the evaluation: no masking check examined an input", NOTHING_ATTACKED
    said, missing, fixes = [], [], []
    square = checks.get("square")
    if square is None:
        missing.append("no black-box Square check ran (the pgd suite runs none)")
        fixes.append("robustness.eval=apgd (or autoattack)")
    elif "samples" in square and not square["samples"]:
        said.append("Square: no white-box survivor to attack (robust accuracy 0, nothing to inflate)")
    else:
        on = f" on {square['samples']} of {square['of_survivors']} white-box survivors" if "samples" in square else ""
        said.append(f"Square ({square['queries']} queries){on} fooled {square['fooled_after_white_box']} more")
    steps = checks.get("steps")
    if steps is None or steps["steps"][0] >= steps["steps"][1]:
        ran = f" ({steps['attack']} with {steps['steps'][1]} step(s) has no fewer-step run)" if steps else ""
        missing.append("no more-steps comparison ran" + ran)
        fixes.append("robustness.attack.steps >= 2")
    else:
        half, whole = steps["robust_fraction"]
        said.append(
            f"{steps['attack']} on {steps['samples']} clean-correct samples left {half:.3f} robust at "
            f"{steps['steps'][0]} steps, {whole:.3f} at {steps['steps'][1]}"
        )
    zero = checks.get("zero_gradients")
    if zero is None:
        missing.append("no zero-gradient check ran")
    else:
        said.append(f"{zero['samples']} of {attacked} clean-correct samples with an all-zero input gradient")
    if missing:
        fix = f"run every check: aisec-train {' '.join(fixes)}" if fixes else "report a bug: a masking check is missing"
        return "fail", "; ".join(missing) + ("; measured: " + "; ".join(said) if said else ""), fix
    return "pass", "no sign of masking: " + "; ".join(said), None


def _sample_words(n: int, of: int) -> str:
    """How much of the test split was attacked, and the override that attacks all of it."""
    if n >= of:
        return f"all {of} test samples"
    return f"a stratified sample of {n} of {of} test samples (robustness.eval_samples=all: every one)"

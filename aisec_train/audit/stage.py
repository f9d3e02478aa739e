"""The pipeline stages of the audit package: ``audit`` (before outputs) and ``register`` (after them).

``audit`` attacks the trained model (membership inference, extraction through the guard), evaluates the
guard's sanitiser under an adaptive attack, probes the guard's refusals, saves the monitoring baseline beside
the model and self-checks the monitor on clean and shifted held-out batches. ``register`` runs once model.pt
exists: it registers the verified checkpoint in the inventory, then rewrites report.json and model_card.md
and writes security_report.md so that all three carry every answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aisec_train.audit import evidence, extraction, guard_eval, membership, monitor, privacy_audit, probes, shifts
from aisec_train.audit.config import CanaryKind, OutputPolicy
from aisec_train.audit.references import reference_recipe
from aisec_train.audit.registry import Registry, resolve_registry_path
from aisec_train.data.views import materialize, subset
from aisec_train.errors import require
from aisec_train.hashing import sha256_file
from aisec_train.report.outputs import write_json
from aisec_train.text_run import is_text, skip_image_audits
from aisec_train.train.callbacks import BudgetStop
from aisec_train.train.loop import train

if TYPE_CHECKING:
    from aisec_train.run_state import Run

ROC_PNG = "membership_roc.png"


@contextmanager
def _cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """``audit.cpu_threads`` for the audits' tiny CPU ops: a fixed count keeps results machine-independent, and one
    thread cannot collapse on an oversubscribed box the way spinning intra-op workers do (docs/audits.md)."""
    before = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stage_audit(run: Run) -> None:
    assert run.model is not None and run.data is not None
    model = run.model.eval()  # audits run where training ran: reference models on a GPU when there is one
    cfg = run.cfg.audit
    run.report.add("governance", **governance(run))
    with _cpu_threads(run.device, cfg.cpu_threads):
        if is_text(run.data):  # token ids: membership runs on losses; the pixel-space audits answer not_applicable
            if cfg.enabled:
                _membership(run, model)
            else:
                run.report.add("audit", membership=None)
                run.report.check("training", evidence.MEMBERSHIP, "not_applicable", "audit.enabled=false: not run")
            skip_image_audits(run)
            _privacy_audit(run)
            return
        if cfg.enabled:
            _membership(run, model)
            _extraction(run, model)
            _guard_probes(run, model)
        else:  # the guard's policy still describes the deployed interface: the threat model names what is set
            guard = {k: getattr(v, "value", v) for k, v in vars(cfg.guard).items()}
            run.report.add("audit", membership=None, extraction=None, sanitization=None, guard_configured=guard)
            for area, item in (("training", evidence.MEMBERSHIP), ("model", evidence.EXTRACTION)):
                run.report.check(area, item, "not_applicable", "audit.enabled=false: not measured in this run")
        _privacy_audit(run)
        _monitoring(run, model)


def check_before_training(run: Run) -> None:
    """The audit's limits that depend on the training split, checked by the last stage before training
    (backdoor/stage.py: stage_poison): a refusal after training would have spent the privacy budget on a model
    the run then never releases. Mislabel canaries are training samples, so there can be at most that many; noise
    canaries are capped the same way, the extraction attacker's planned queries by dataset.max_bytes, and a top-k
    output policy must withhold something (k below the number of classes)."""
    cfg = run.cfg.audit
    assert run.data is not None
    n = len(run.data.train)
    if cfg.enabled and not is_text(run.data):
        # The extraction attacker's plan is one float32 tensor of queries x input size, built after training.
        per_input = 4 * int(np.prod(run.data.input_shape))
        most = max(1, run.cfg.dataset.max_bytes // per_input)
        require(
            cfg.extraction.queries <= most,
            "audit.extraction.queries",
            cfg.extraction.queries,
            f"at most {most} for inputs of shape {tuple(run.data.input_shape)} (the attacker's planned queries are "
            f"held in memory: {per_input} bytes each, bounded by dataset.max_bytes={run.cfg.dataset.max_bytes})",
        )
        classes = run.data.num_classes
        if cfg.guard.output is OutputPolicy.top_k:  # top-k of k classes releases every probability: no policy at all
            require(
                cfg.guard.top_k < classes,
                "audit.guard.top_k",
                cfg.guard.top_k,
                f"must be < the {classes} classes with audit.guard.output=top_k (k >= classes releases the full "
                "probability vector, which the report would call a top-k policy); use audit.guard.output=probs",
            )
    if cfg.privacy_audit:
        # Mislabel canaries are training samples; noise canaries beyond the training split would audit a model of
        # mostly noise, not the audited recipe on its data (and m in the millions never finishes).
        why = {
            CanaryKind.mislabel: "mislabel canaries are training samples; audit.canaries.kind=noise adds its own",
            CanaryKind.noise: "with audit.canaries.kind=noise the canary model would otherwise train mostly on noise, "
            "not on the audited recipe's data",
        }[cfg.canaries.kind]
        require(cfg.canaries.m <= n, "audit.canaries.m", cfg.canaries.m, f"must be <= the {n} training samples ({why})")


def _privacy_audit(run: Run) -> None:
    """One-run privacy audit: one more model, trained with the audited recipe on canaries, and the empirical
    epsilon lower bound beside the claimed epsilon (the item fails when the claim is refuted)."""
    cfg = run.cfg
    if not cfg.audit.privacy_audit:
        run.report.add("audit", privacy_audit=None)
        run.report.check("training", privacy_audit.ITEM, "not_applicable", "audit.privacy_audit=off: not run")
        return
    assert run.data is not None and run.factory is not None
    data, factory, claimed = run.data, run.factory, run.report.get("privacy.epsilon")
    noise = run.report.get("privacy.noise_multiplier")
    # The audited mechanism exactly: its noise multiplier (not a recalibration), its clip, objective and optimizer.
    audited = dataclasses.replace(cfg.privacy, noise_multiplier=noise, target_epsilon=None) if noise else cfg.privacy

    # The audited run's steps, not its planned epochs: a run the privacy budget stopped early claims the epsilon of
    # the steps it took, and a canary model trained on to the planned epochs would spend more than that claim (its
    # bound could then refute a claim the released model keeps). The same stop the audited run had (BudgetStop at
    # its step count) ends the canary model's training there, under the same schedule horizon; without DP no budget
    # stops a run and there is no step count to match.
    audited_steps = run.report.get("privacy.steps") if noise else None
    stops = [BudgetStop(audited_steps)] if audited_steps is not None else []
    canary_run: dict = {}

    def train_canary_model(dataset):
        # The audited sample rate: the canary set is smaller (excluded canaries), so the batch shrinks with it.
        batch = max(1, round(cfg.train.batch_size * len(dataset) / len(data.train)))
        result = train(
            factory(seed=cfg.train.seed + 7),
            data.training_view(dataset),
            train_cfg=dataclasses.replace(cfg.train, batch_size=batch),
            privacy_cfg=audited,
            device=run.device,
            progress=False,
            callbacks=stops,
            **reference_recipe(cfg),
        )
        canary_run["epsilon"] = result.ledger.epsilon() if result.ledger is not None else None
        canary_run["batch_size"] = batch
        canary_run["steps"] = result.ledger.steps if result.ledger is not None else None
        canary_run["epochs"] = result.history[-1]["epoch"] if result.history else 0
        return result.model

    canaries = cfg.audit.canaries
    result = privacy_audit.run_privacy_audit(
        train_canary_model,
        data.train,
        m=canaries.m,
        seed=cfg.train.seed,
        delta=cfg.privacy.delta,
        canary_kind=canaries.kind.value,
        num_classes=data.num_classes,
        confidence=canaries.confidence,
    )
    answer = privacy_audit.verdict(result, claimed)
    canary = {f"canary_{k}": v for k, v in canary_run.items()}  # the canary model's own (epsilon, batch, steps)
    audited_run = {
        "audited_steps": audited_steps,
        "audited_stopped_by_budget": bool(run.report.get("train.stopped_by_budget")),
    }
    run.report.add("audit", privacy_audit={**result, "claimed_epsilon": claimed, **canary, **audited_run})
    trained = _canary_training_text(canary_run, audited_run, run.report.get("train.epochs_planned"))
    run.report.check("training", privacy_audit.ITEM, answer["status"], f"{answer['evidence']}; {trained}")


def _canary_training_text(canary: dict, audited: dict, planned_epochs: int | None) -> str:
    """What the canary model trained, beside the audited run: the evidence says whether the two match."""
    eps = canary.get("epsilon")
    spent = f", its epsilon {eps:.3f}" if eps is not None else ""
    if audited["audited_steps"] is None:
        return f"canary model trained {canary.get('epochs')} epoch(s) of the audited recipe{spent}"
    stop = (
        f", stopped by the privacy budget before its {planned_epochs} planned epochs"
        if audited["audited_stopped_by_budget"]
        else ""
    )
    return f"canary model trained {canary.get('steps')} step(s) (audited run: {audited['audited_steps']}{stop}){spent}"


def governance(run: Run) -> dict[str, Any]:
    cfg = run.cfg.audit
    measured = run.data.manifest.get("source") if run.data else None
    return {
        "purpose": cfg.purpose,
        "data_sources": list(cfg.data_sources) or [measured],
        "data_source_measured": measured,
        "owner": cfg.owner,
        "risk_level": cfg.risk_level.value,
    }


# The fewest members (and as many non-members) a membership verdict rests on: the config's own floor for
# audit.membership.targets. A smaller held-out split (or half the training split) caps the targets below it; the
# item is then not applicable, with the reason, never a pass or a fail on a handful of samples.
MIN_MEMBERSHIP_TARGETS = 10
# The extraction comparison splits the held-out split into the attacker's half and the evaluation half: each
# needs at least one sample (with one held-out sample the attacker's half was empty and the run crashed).
MIN_EXTRACTION_HELDOUT = 2


def _membership(run: Run, model: torch.nn.Module) -> None:
    assert run.data is not None and run.factory is not None
    n_test, n_train = len(run.data.test), len(run.data.train)
    m = min(run.cfg.audit.membership.targets, n_test, n_train // 2)
    if m < MIN_MEMBERSHIP_TARGETS:
        why = (
            f"only {m} member and {m} non-member target(s) ({n_test} held-out sample(s), {n_train} training "
            f"sample(s): at most half of them); a membership verdict needs at least {MIN_MEMBERSHIP_TARGETS} of each"
        )
        run.report.add("audit", membership={"not_applicable": why})
        run.report.check("training", evidence.MEMBERSHIP, "not_applicable", why)
        return
    result = membership.membership_audit(
        model,
        run.data,
        factory=run.factory,
        cfg=run.cfg,
        device=run.device,
        noise_multiplier=run.report.get("privacy.noise_multiplier"),
        max_steps=_central_steps(run),
    )
    summary = result.summary
    eps = run.report.get("privacy.epsilon")
    delta = run.report.get("privacy.delta") or 0.0
    if eps is not None:
        n = len(result.attacks)  # the Bonferroni count: the attacks this run maximises over (1 without references)
        checks = {a.name: membership.dp_bound_check(a.labels, a.scores, eps, delta, attacks=n) for a in result.attacks}
        summary["dp_bound"] = {"respected": all(c["respected"] for c in checks.values()), "attacks": checks}
    membership.plot_roc(result.attacks, run.run_dir / ROC_PNG, epsilon=eps, delta=delta)
    summary["roc_png"] = ROC_PNG
    run.report.add("audit", membership=summary)
    status, text = evidence.membership(summary, eps, delta, run.cfg.audit.membership.max_auc)
    fix = evidence.TOO_FEW_TARGETS_FIX if evidence.untestable(summary) else None
    run.report.check("training", evidence.MEMBERSHIP, status, text, fix=fix)


def _central_steps(run: Run) -> int | None:
    """The DP-SGD steps the audited model took, which no reference model passes (a budget stop ends a run before
    its planned epochs). None without DP, and for a federated run, whose steps are its clients' (or its rounds)."""
    if not run.report.get("privacy.noise_multiplier") or run.report.get("train.trainer") == "federated":
        return None
    return run.report.get("privacy.steps")


def _extraction(run: Run, model: torch.nn.Module) -> None:
    assert run.data is not None and run.factory is not None
    cfg, seed = run.cfg.audit, run.cfg.train.seed
    if len(run.data.test) < MIN_EXTRACTION_HELDOUT:
        why = (
            f"{len(run.data.test)} held-out sample(s); the extraction attacker's half and the evaluation half need "
            f"{MIN_EXTRACTION_HELDOUT} in all"
        )
        run.report.add("audit", extraction={"not_applicable": why}, sanitization=None)
        run.report.check("model", evidence.EXTRACTION, "not_applicable", why)
        run.report.check("model", evidence.SANITIZATION, "not_applicable", why)
        return
    # Bounded samples of the held-out split: the attacker needs at most its planned queries of originals.
    attacker_x, evaluation = extraction.split_heldout(run.data.test, seed, attacker_limit=cfg.extraction.queries)
    comparison = guard_eval.compare_guard(
        model,
        attacker_x,
        evaluation,
        guard_cfg=cfg.guard,
        queries=cfg.extraction.queries,
        seeds=[seed + i for i in range(cfg.extraction.seeds)],
        factory=run.factory,
        epochs=cfg.extraction.surrogate_epochs,
    )
    guarded = comparison["settings"]["guarded"]
    policy = {k: getattr(v, "value", v) for k, v in vars(cfg.guard).items()}
    summary = {
        # The contract's headline figures: the guarded attacker, averaged over the paired seeds.
        "fidelity": guarded.get("fidelity", {}).get("mean"),
        "fidelity_std": guarded.get("fidelity", {}).get("std"),
        "surrogate_accuracy": guarded.get("surrogate_accuracy", {}).get("mean"),
        **comparison,
        "guard": policy,
        "attacker_data": f"{len(attacker_x)} held-out inputs + shifted/noisy copies; scored on "
        f"{len(evaluation)} other held-out samples",
    }
    run.report.add("audit", extraction=summary)
    run.report.check("model", evidence.EXTRACTION, *evidence.extraction(summary))

    ex = cfg.extraction
    n = min(ex.eval_samples, len(evaluation))
    sanit = extraction.sanitizer_robustness(
        model,
        evaluation.x[:n],
        evaluation.y[:n],
        bit_depth=ex.sanitizer_bit_depth,
        smoothing=ex.sanitizer_smoothing,
        attack=run.cfg.robustness.attack,
        backend=run.cfg.robustness.backend,
    )
    run.report.add("audit", sanitization=sanit)
    run.report.check("model", evidence.SANITIZATION, *evidence.sanitization(sanit))


def _guard_probes(run: Run, model: torch.nn.Module) -> None:
    assert run.data is not None
    x, _ = materialize(run.data.test, limit=4)  # four valid held-out inputs, bent into malformed ones
    result = probes.guard_probes(model, x, run.cfg.audit.guard)
    run.report.add("audit", guard_probes=result)
    budget_refusal = run.report.get("audit.extraction.refusal")
    # Without a rate limit the item fails for want of one, not for a bug in the guard: the fix says what to set.
    fix = None if result["rate_limit"]["configured"] else evidence.NO_RATE_LIMIT_FIX
    run.report.check("deployment", evidence.GUARD, *evidence.guard(result, budget_refusal), fix=fix)


# The monitor's baseline statistics come from at most this many training inputs (seeded) and held-out inputs:
# enough for stable per-feature means and confidence quantiles, and a bound that keeps the stage's memory flat
# however large the dataset is (they are held as tensors, unlike the streamed training data).
MONITOR_TRAIN_SAMPLES = 5_000
MONITOR_HELDOUT_SAMPLES = 2_000
# Confidence is calibrated on the even held-out samples (its std needs two) and the self-check runs on the odd
# ones (at least one): three in all. A smaller test split (a toy or API check) trains and evaluates as usual and
# reports monitoring as not applicable; it used to crash after training (an empty half in audit/shifts.py).
MONITOR_MIN_HELDOUT = 3


def _monitoring(run: Run, model: torch.nn.Module) -> None:
    assert run.data is not None
    data, cfg = run.data, run.cfg.audit.monitor
    n_train = len(data.train)
    rows = np.random.default_rng(run.cfg.train.seed).permutation(n_train)[:MONITOR_TRAIN_SAMPLES]
    train_x, _ = materialize(subset(data.train, np.sort(rows)))
    mode = "all" if len(train_x) == n_train else "seeded_sample"  # the words of the data stage's sanity coverage
    test_x, _ = materialize(data.test, limit=MONITOR_HELDOUT_SAMPLES)
    if len(test_x) < MONITOR_MIN_HELDOUT:  # an empty half would crash below
        why = f"{len(test_x)} held-out sample(s); the baseline and its self-check need {MONITOR_MIN_HELDOUT}"
        run.report.add("monitoring", not_applicable=why)
        run.report.check(
            "monitoring", "baseline input and confidence statistics saved with the model", "not_applicable", why
        )
        run.report.check("monitoring", evidence.DRIFT, "not_applicable", why)
        return
    meta = {
        "target": run.factory.target if run.factory else None,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
    }
    # Confidence is calibrated on the even held-out samples; the odd ones stay unseen for the self-check.
    baseline = monitor.build_baseline(model, train_x, test_x[0::2], model_meta=meta, cfg=cfg)
    path = run.run_dir / monitor.BASELINE
    write_json(baseline, path)
    clean = test_x[1::2]
    batches = {"clean_heldout": clean, **shifts.shifted_batches(clean, seed=run.cfg.train.seed)}
    verdicts = {name: monitor.check(baseline, model, batch) for name, batch in batches.items()}
    digest = sha256_file(path)
    run.report.add(
        "monitoring",
        baseline=path.name,
        baseline_sha256=digest,
        n_train=baseline["n_train"],
        train_coverage={"mode": mode, "checked": len(train_x), "of": n_train},
        confidence=baseline["confidence"],
        thresholds=baseline["thresholds"],
        self_check={
            k: {"alarm": v.alarm, "drift_score": v.drift_score, "confidence_z": v.confidence_z, "n": v.n}
            for k, v in verdicts.items()
        },
    )
    run.report.check(
        "monitoring",
        "baseline input and confidence statistics saved with the model",
        "pass",
        f"{path.name} (SHA-256 {digest[:16]}...): {2 * int(np.prod(data.input_shape))} "
        f"feature statistics over {baseline['n_train']} training inputs, confidence mean "
        f"{baseline['confidence']['mean']:.3f} on {baseline['confidence']['n_calibration']} held-out",
    )
    run.report.check("monitoring", evidence.DRIFT, *evidence.drift(verdicts, cfg.drift_threshold))


def stage_register(run: Run) -> None:
    reg = Registry(resolve_registry_path(run.cfg.audit.registry_path))
    # a RegistryError is a Refusal (aisec_train/errors.py): the CLI answers it in one line as it is
    entry = reg.register(run.run_dir, governance=run.report.get("governance"), report=run.report.to_dict())
    run.report.add(
        "registry", path=str(reg.path), id=entry["id"], sha256=entry["sha256"], known_good=entry["known_good"]
    )
    run.report.check(
        "deployment",
        evidence.REGISTRY,
        "pass",
        f"{entry['id']} in {reg.path}: model.pt SHA-256 verified ({entry['sha256'][:16]}...), headline metrics and "
        f"governance (owner {entry['governance'].get('owner')}, risk {entry['governance'].get('risk_level')}) "
        "recorded; `aisec-train-registry mark-good` / `rollback` restore a hash-verified known-good copy",
    )

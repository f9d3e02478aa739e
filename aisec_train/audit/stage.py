"""The pipeline stages of the audit package: ``audit`` (before outputs) and ``register`` (after them).

``audit`` attacks the trained model (membership inference, extraction through the guard), evaluates the
guard's sanitiser under an adaptive attack, probes the guard's refusals, saves the monitoring baseline beside
the model and self-checks the monitor. ``register`` runs once model.pt exists: it registers the verified
checkpoint in the inventory, then rewrites report.json and model_card.md and writes security_report.md so
that all three carry every answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aisec_train.audit import extraction, membership, monitor
from aisec_train.audit.guard import Guard, QueryRefused
from aisec_train.audit.registry import Registry
from aisec_train.config import GuardConfig, OutputPolicy
from aisec_train.data.dataset import sha256_file

if TYPE_CHECKING:
    from aisec_train.pipeline import Run

log = logging.getLogger("aisec_train")
ROC_PNG = "membership_roc.png"


def stage_audit(run: Run) -> None:
    assert run.model is not None and run.data is not None
    model = run.model.cpu().eval()  # the audits are small: CPU keeps them deterministic and device-agnostic
    cfg = run.cfg.audit
    run.report.add("governance", **governance(run))
    if cfg.enabled:
        _membership(run, model)
        _extraction(run, model)
        _guard_probes(run, model)
    else:
        run.report.add("audit", membership=None, extraction=None, sanitization=None)
        for area, item in (("training", "membership-inference audit"), ("model", "model-extraction test")):
            run.report.check(area, item, "not_applicable", "audit.enabled=false: not measured in this run")
    _monitoring(run, model)
    run.model.to(run.device)


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


def _membership(run: Run, model: torch.nn.Module) -> None:
    assert run.data is not None
    result = membership.membership_audit(model, run.data, cfg=run.cfg, device=torch.device("cpu"))
    summary = result.summary
    eps = run.report.get("privacy.epsilon")
    delta = run.report.get("privacy.delta") or 0.0
    if eps is not None:
        checks = {a.name: membership.dp_bound_check(a.labels, a.scores, eps, delta) for a in result.attacks}
        summary["dp_bound"] = {"respected": all(c["respected"] for c in checks.values()), "attacks": checks}
    membership.plot_roc(result.attacks, run.run_dir / ROC_PNG, epsilon=eps, delta=delta)
    summary["roc_png"] = ROC_PNG
    run.report.add("audit", membership=summary)

    numbers = (
        f"AUC {summary['auc']:.3f}, TPR {summary['tpr_at_fpr_0_001']:.3f} at 0.1% FPR and "
        f"{summary['tpr_at_fpr_0_01']:.3f} at 1% FPR (worst of {', '.join(summary['attacks'])}; "
        f"{summary['members']} members vs {summary['nonmembers']} non-members, {summary['reference_models']} "
        f"reference model(s))"
    )
    if eps is not None:
        bound = summary["dp_bound"]
        ok = bound["respected"]
        lb = max(c["empirical_epsilon_lower_bound"] for c in bound["attacks"].values())
        evidence = (
            f"{numbers}; measured pairs {'respect' if ok else 'VIOLATE'} TPR <= e^{eps:.2f} FPR + {delta:g} "
            f"(95% Clopper-Pearson); empirical epsilon lower bound {lb:.2f}"
        )
    else:
        ok = summary["auc"] <= run.cfg.audit.membership.max_auc
        evidence = f"{numbers}; no DP guarantee, pass requires AUC <= {run.cfg.audit.membership.max_auc}"
    run.report.check("training", "membership-inference audit", "pass" if ok else "fail", evidence)


def _extraction(run: Run, model: torch.nn.Module) -> None:
    assert run.data is not None
    cfg, seed = run.cfg.audit, run.cfg.train.seed
    attacker_x, evaluation = extraction.split_heldout(run.data.test, seed)
    inputs = extraction.attacker_queries(attacker_x, cfg.extraction.queries, seed)
    kwargs = dict(
        model_name=run.cfg.model.name.value,
        num_classes=run.data.num_classes,
        epochs=cfg.extraction.surrogate_epochs,
        seed=seed,
    )
    shape = tuple(run.data.test.x.shape[1:])

    def attack(guard_cfg: GuardConfig, planned: torch.Tensor) -> dict[str, Any]:
        return extraction.run_extraction(
            Guard(model, input_shape=shape, cfg=guard_cfg), planned, model, evaluation, **kwargs
        )

    open_api = GuardConfig(output=OutputPolicy.probs, query_budget=0)
    guarded = attack(cfg.guard, inputs)
    undefended = attack(open_api, inputs)
    same = attack(open_api, inputs[: guarded["queries"]]) if guarded["queries"] else None
    policy = {k: (v.value if isinstance(v, OutputPolicy) else v) for k, v in vars(cfg.guard).items()}
    summary = {
        **guarded,
        "guard": policy,
        "undefended": undefended,
        "full_probs_same_queries": same,
        "attacker_data": f"{len(attacker_x)} held-out inputs + shifted/noisy copies; scored on "
        f"{len(evaluation)} other held-out samples",
    }
    run.report.add("audit", extraction=summary)
    ex = cfg.extraction
    n = min(ex.eval_samples, len(evaluation))
    sanit = extraction.sanitizer_robustness(
        model,
        evaluation.x[:n],
        evaluation.y[:n],
        bit_depth=ex.sanitizer_bit_depth,
        smoothing=ex.sanitizer_smoothing,
        attack=run.cfg.robustness.eval,
        backend=run.cfg.robustness.backend,
    )
    run.report.add("audit", sanitization=sanit)

    lowered = same is not None and guarded["fidelity"] is not None and guarded["fidelity"] < same["fidelity"]
    run.report.check(
        "model",
        "model-extraction test",
        "pass" if lowered else "fail",
        f"guard ({policy['output']}, budget {policy['query_budget']}): fidelity {_f(guarded['fidelity'])}, surrogate "
        f"accuracy {_f(guarded['surrogate_accuracy'])} after {guarded['queries']} of {guarded['planned_queries']} "
        f"planned queries (stopped by guard: {guarded['stopped_by_guard']}); full probabilities at the same "
        f"{guarded['queries']} queries: fidelity {_f(same and same['fidelity'])}; unguarded with all "
        f"{undefended['queries']}: fidelity {_f(undefended['fidelity'])}",
    )
    honest = sanit["robust_accuracy_adaptive"] <= sanit["robust_accuracy_plain"]
    run.report.check(
        "model",
        "input sanitisation evaluated under an adaptive attack",
        "pass" if honest else "fail",
        f"bit depth {ex.sanitizer_bit_depth}, median {ex.sanitizer_smoothing or 'off'}: robust accuracy "
        f"{sanit['robust_accuracy_plain']:.3f} under plain PGD (gradient masking) but "
        f"{sanit['robust_accuracy_adaptive']:.3f} under BPDA-PGD vs {sanit['robust_accuracy_undefended']:.3f} "
        f"undefended (clean {sanit['clean_accuracy_sanitized']:.3f} / {sanit['clean_accuracy_undefended']:.3f}); "
        "only the adaptive figure is claimed",
    )


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _guard_probes(run: Run, model: torch.nn.Module) -> None:
    """Send malformed and over-fast queries to a guard and count what it refused (measured, not assumed)."""
    assert run.data is not None
    x = run.data.test.x[:4]
    guard = Guard(model, input_shape=tuple(x.shape[1:]), cfg=run.cfg.audit.guard)
    malformed = {
        "wrong shape": x[:, :, :-1],
        "missing batch axis": x[0],
        "float64": x.double(),
        "uint8 array": (x.numpy() * 255).astype(np.uint8),
        "NaN": torch.full_like(x, float("nan")),
        "out of range": x + 2.0,
        "python list": x.tolist(),
    }
    refused = {}
    for name, bad in malformed.items():
        try:
            guard.query("probe", bad)
            refused[name] = None
        except QueryRefused as err:
            refused[name] = str(err)
    clock = _FakeClock()
    limited = Guard(
        model,
        input_shape=tuple(x.shape[1:]),
        clock=clock,
        cfg=GuardConfig(output=OutputPolicy.label, query_budget=0, rate_limit=10.0, burst=4),
    )
    limited.query("probe", x)
    try:
        limited.query("probe", x[:1])
        rate_refused = False
    except QueryRefused:
        rate_refused = True
    clock.now += 0.2  # two tokens back at 10 queries/s
    limited.query("probe", x[:2])
    probes = {
        "malformed_refused": sum(v is not None for v in refused.values()),
        "malformed_sent": len(refused),
        "refusals": refused,
        "rate_limit_refused_burst": rate_refused,
    }
    run.report.add("audit", guard_probes=probes)
    ok = probes["malformed_refused"] == len(refused) and rate_refused
    run.report.check(
        "deployment",
        "guarded query interface refuses malformed and over-rate queries",
        "pass" if ok else "fail",
        f"{probes['malformed_refused']}/{len(refused)} malformed queries refused ({', '.join(refused)}); "
        f"a query beyond the rate-limit burst {'was' if rate_refused else 'was NOT'} refused; the attacker's "
        f"budget refusal: {run.report.get('audit.extraction.refusal', 'none')}",
    )


def _monitoring(run: Run, model: torch.nn.Module) -> None:
    assert run.data is not None
    data, cfg = run.data, run.cfg.audit.monitor
    meta = {
        "name": run.cfg.model.name.value,
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "image_size": data.image_size,
    }
    # Confidence is calibrated on the even held-out samples; the odd ones stay unseen for the self-check.
    baseline = monitor.build_baseline(model, data.train.x, data.test.x[0::2], model_meta=meta, cfg=cfg)
    path = run.run_dir / monitor.BASELINE
    path.write_text(json.dumps(baseline))
    clean = data.test.x[1::2]
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    verdicts = {
        "clean_heldout": monitor.check(baseline, model, clean),
        "gaussian_noise_0.2": monitor.check(baseline, model, noisy),
    }
    run.report.add(
        "monitoring",
        baseline=path.name,
        baseline_sha256=sha256_file(path),
        n_train=baseline["n_train"],
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
        f"{path.name} (SHA-256 {sha256_file(path)[:16]}...): {2 * int(np.prod(data.train.x.shape[1:]))} "
        f"feature statistics over {baseline['n_train']} training inputs, confidence mean "
        f"{baseline['confidence']['mean']:.3f} on {baseline['confidence']['n_calibration']} held-out",
    )
    c, s = verdicts["clean_heldout"], verdicts["gaussian_noise_0.2"]
    ok = not c.alarm and s.alarm
    run.report.check(
        "monitoring",
        "drift check separates a shifted batch from a clean one",
        "pass" if ok else "fail",
        f"clean held-out batch (n={c.n}): {'ALARM' if c.alarm else 'ok'}, drift {c.drift_score:.2f}; "
        f"noisy copy: {'ALARM' if s.alarm else 'ok'}, drift {s.drift_score:.2f} "
        f"(threshold {cfg.drift_threshold}); command: aisec-train-monitor RUN_DIR batch.npz",
    )


def registry_path(run: Run) -> Path:
    configured = run.cfg.audit.registry_path
    return Path(configured) if configured else run.run_dir.parent / "registry.json"


def stage_register(run: Run) -> None:
    from aisec_train.report import outputs, security_report

    reg = Registry(registry_path(run))
    entry = reg.register(run.run_dir, governance=run.report.get("governance"))
    run.report.add(
        "registry", path=str(reg.path), id=entry["id"], sha256=entry["sha256"], known_good=entry["known_good"]
    )
    run.report.check(
        "deployment",
        "checkpoint registered in the model inventory (known-good registry with rollback)",
        "pass",
        f"{entry['id']} in {reg.path}: model.pt SHA-256 verified ({entry['sha256'][:16]}...), headline metrics and "
        f"governance (owner {entry['governance'].get('owner')}, risk {entry['governance'].get('risk_level')}) "
        "recorded; `aisec-train-registry mark-good` / `rollback` restore a hash-verified known-good copy",
    )
    security_report.write(run.report, run.run_dir)
    (run.run_dir / "model_card.md").write_text(outputs.model_card(run.report))
    run.report.write(run.run_dir / "report.json")

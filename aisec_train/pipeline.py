"""A run is a list of named stages; each reads the shared :class:`Run` and adds a section to its Report.

    data -> [poison] -> train -> [detect/repair] -> evaluate -> robustness -> audit -> outputs -> register

Later stages (backdoor, federated, audits) plug in by adding a function to ``STAGES``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aisec_train.audit.stage import stage_audit, stage_register
from aisec_train.backdoor.stage import stage_defend, stage_poison
from aisec_train.config import Config, PrivacyMode
from aisec_train.data.dataset import Dataset, load_dataset
from aisec_train.data.sanity import check_training_split
from aisec_train.models import build_model
from aisec_train.report import outputs
from aisec_train.report.report import Report
from aisec_train.robust.adversary import adversary_from_config
from aisec_train.train import checkpoint
from aisec_train.train.distributed import DistributedJob, train_distributed
from aisec_train.train.ledger import BudgetExhausted
from aisec_train.train.loop import TrainResult, accuracy, resolve_device, train

log = logging.getLogger("aisec_train")


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    experiment: str = "quickstart"
    report: Report = field(default_factory=Report)
    device: torch.device = torch.device("cpu")
    data: Dataset | None = None
    model: nn.Module | None = None
    result: TrainResult | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"


def stage_data(run: Run) -> None:
    cfg = run.cfg
    data = load_dataset(cfg.dataset, seed=cfg.train.seed)
    sanity = check_training_split(data.train.x, data.train.y, data.num_classes, cfg.dataset.outlier_z)
    data.record("sanity_checks", findings=len(sanity["findings"]))
    run.data = data
    run.report.add(
        "data",
        name=data.name,
        manifest_sha256=data.manifest_sha256,
        manifest=data.manifest,
        n_train=len(data.train),
        n_test=len(data.test),
        num_classes=data.num_classes,
        shape=list(data.train.x.shape[1:]),
        sanity=sanity,
        lineage=data.lineage,
    )
    pinned = cfg.dataset.sha256 is not None
    run.report.check(
        "data pipeline",
        "data integrity verified against a pinned hash",
        "pass" if pinned else "fail",
        f"manifest SHA-256 {data.manifest_sha256}"
        + (" matched dataset.sha256" if pinned else "; no dataset.sha256 pin was given, so nothing was verified"),
    )
    run.report.check(
        "data pipeline",
        "data lineage recorded",
        "pass",
        " -> ".join(step["step"] for step in data.lineage),
    )
    findings = sanity["findings"]
    run.report.check(
        "data pipeline",
        "sanity checks before training (NaN/inf, range, labels, balance, duplicates, outliers)",
        "pass",
        f"{len(findings)} finding(s): " + (", ".join(f["check"] for f in findings) or "none"),
    )


def _load_resume(run: Run) -> dict[str, Any] | None:
    if not run.checkpoint_path.exists():
        return None
    payload = checkpoint.load(run.checkpoint_path)
    meta, data = payload.get("meta", {}), run.data
    assert data is not None
    if meta.get("manifest_sha256") != data.manifest_sha256 or meta.get("model") != run.cfg.model.name.value:
        raise checkpoint.CheckpointError(
            f"{run.run_dir} holds a run of model={meta.get('model')} on data {meta.get('manifest_sha256')}; "
            f"this config trains model={run.cfg.model.name.value} on {data.manifest_sha256}. Use another hydra.run.dir"
        )
    if meta.get("private") != (run.cfg.privacy.mode is PrivacyMode.dpsgd):
        raise checkpoint.CheckpointError(
            f"{run.run_dir} was trained with privacy={'dpsgd' if meta.get('private') else 'none'}; "
            "privacy cannot be switched on resume. Use another hydra.run.dir"
        )
    log.info("resuming %s from epoch %d", run.checkpoint_path, payload["epoch"])
    return payload


def stage_train(run: Run) -> None:
    if run.cfg.federated.mode.value != "none":  # federated training (issue 5) replaces central training
        from aisec_train.federated.stage import train_federated

        train_federated(run)
        return
    cfg, data = run.cfg, run.data
    assert data is not None
    run.device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # the initial weights are part of what the seed reproduces
    model_kwargs = {"in_channels": data.in_channels, "num_classes": data.num_classes, "image_size": data.image_size}
    model = build_model(cfg.model.name.value, **model_kwargs)
    resume = _load_resume(run)
    meta = {"manifest_sha256": data.manifest_sha256, "model": cfg.model.name.value}
    meta["private"] = cfg.privacy.mode is PrivacyMode.dpsgd

    if cfg.train.distributed.nproc > 1:
        result = train_distributed(
            DistributedJob(
                cfg.model.name.value,
                model_kwargs,
                data.train,
                data.test,
                cfg.train,
                cfg.privacy,
                cfg.robustness,
                run.device.type,
                resume,
                run.checkpoint_path,
                meta,
            )
        )
    else:

        def persist(payload: dict[str, Any]) -> None:
            checkpoint.save({**payload, "meta": meta}, run.checkpoint_path)

        result = train(
            model,
            data.train,
            train_cfg=cfg.train,
            privacy_cfg=cfg.privacy,
            device=run.device,
            adversary=adversary_from_config(cfg.robustness),
            resume=resume,
            eval_split=data.test,
            on_epoch_end=persist,
        )
    run.model, run.result = result.model, result
    run.report.add(
        "train",
        epochs_completed=result.history[-1]["epoch"] if result.history else 0,
        epochs_planned=cfg.train.epochs,
        resumed_from_epoch=resume["epoch"] if resume else None,
        stopped_by_budget=result.stopped_by_budget,
        device=str(run.device),
        adversarial_training=cfg.robustness.mode.value,
        world_size=result.world_size,
        distributed=result.distributed,
        checkpoint=str(run.checkpoint_path.relative_to(run.run_dir)),
        checkpoint_sha256=checkpoint.recorded_hash(run.checkpoint_path),
    )
    _report_privacy(run, result)


def _report_privacy(run: Run, result: TrainResult) -> None:
    cfg = run.cfg.privacy
    if result.ledger is None:
        run.report.add("privacy", **dict.fromkeys(["epsilon", "delta", "noise_multiplier", "sample_rate", "steps"]))
        run.report.add("privacy", accountant=None, mode="none")
        run.report.check(
            "training", "differentially private training (DP-SGD)", "fail", "privacy=none: no DP guarantee"
        )
        return
    summary = result.ledger.summary()
    run.report.add(
        "privacy",
        **summary,
        mode="dpsgd",
        target_epsilon=cfg.target_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        grad_sample_mode=result.grad_sample_mode,
        poisson_sampling=cfg.poisson_sampling,
    )
    within = cfg.target_epsilon is None or summary["epsilon"] <= cfg.target_epsilon + 1e-9
    run.report.check(
        "training",
        "differentially private training (DP-SGD)",
        "pass" if within else "fail",
        f"({summary['epsilon']:.3f}, {summary['delta']:g})-DP by the {summary['accountant']} accountant over "
        f"{summary['steps']} steps, noise multiplier {summary['noise_multiplier']:.3f}, sample rate "
        f"{summary['sample_rate']:.4f}, clip {cfg.max_grad_norm}; target epsilon {cfg.target_epsilon}",
    )


def stage_evaluate(run: Run) -> None:
    assert run.model is not None and run.data is not None
    clean = accuracy(run.model, run.data.test, run.device)
    run.report.add("metrics", clean_accuracy=clean, n_test=len(run.data.test))


def stage_robustness(run: Run) -> None:
    rob = run.cfg.robustness
    if not rob.evaluate:
        run.report.add("robustness", robust_accuracy=None, attack=None)
        return
    from aisec_train.robust.adversary import robust_accuracy

    assert run.model is not None and run.data is not None
    test = run.data.test
    n = rob.eval_samples or len(test)
    x, y = test.x[:n].to(run.device), test.y[:n].to(run.device)
    attack = {
        "name": rob.eval.name,
        "norm": rob.eval.norm.value,
        "eps": rob.eval.eps,
        "step_size": rob.eval.step_size,
        "steps": rob.eval.steps,
        "restarts": rob.eval.restarts,
    }
    robust = robust_accuracy(run.model, x, y, **attack, backend=rob.backend)
    run.report.add("robustness", robust_accuracy=robust, attack=attack, n_samples=n, training=rob.mode.value)
    clean = run.report.get("metrics.clean_accuracy")
    run.report.check(
        "model",
        "tested against evasion attacks",
        "pass",
        f"{attack['name'].upper()}-{attack['steps']} ({attack['norm']}, eps {attack['eps']}, {attack['restarts']} "
        f"restart(s)) on {n} test samples: robust accuracy {robust:.3f} vs clean {clean:.3f}",
    )


def stage_outputs(run: Run) -> None:
    assert run.model is not None
    model_path = run.run_dir / "model.pt"
    digest = checkpoint.save({k: v.cpu() for k, v in run.model.state_dict().items()}, model_path)
    run.report.add("model", name=run.cfg.model.name.value, path=model_path.name, sha256=digest)
    run.report.check(
        "model",
        "checkpoint hashed and verified before loading",
        "pass",
        f"model.pt SHA-256 {digest}; checkpoints are written atomically and loaded with weights_only=True "
        "after their hash is verified",
    )
    run.report.add("run", experiment=run.experiment, timings=run.timings)
    outputs.write_all(run.report, run.result.history if run.result else [], run.run_dir)


Stage = Callable[[Run], None]
# The run, top to bottom. A stage that does not apply to this config returns at once (and says so in
# the report); each threat's stage lives in its own package.
STAGES: list[tuple[str, Stage]] = [
    ("data", stage_data),
    ("backdoor_poison", stage_poison),  # BadNets red team: poisons the training split only
    ("train", stage_train),
    # Before evaluation, so that every later figure (clean and robust accuracy, audits) is of the released model.
    ("backdoor_defend", stage_defend),  # detection, optional filter, Fine-Pruning
    ("evaluate", stage_evaluate),
    ("robustness", stage_robustness),
    ("audit", stage_audit),  # membership inference, extraction against the guard, monitoring baseline
    ("outputs", stage_outputs),
    ("register", stage_register),  # needs model.pt; rewrites report.json, model_card.md, security_report.md
]


def run_pipeline(cfg: Config, run_dir: Path, experiment: str = "quickstart") -> Report:
    run = Run(cfg=cfg, run_dir=run_dir, experiment=experiment)
    for name, stage in STAGES:
        started = time.perf_counter()
        log.info("stage %s", name)
        stage(run)
        run.timings[name] = round(time.perf_counter() - started, 3)
    return run.report


__all__ = ["Run", "STAGES", "run_pipeline", "BudgetExhausted"]

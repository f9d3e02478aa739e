"""A run is a list of named stages; each reads the shared :class:`~aisec_train.run_state.Run`, fills its own slots and
adds a section to the one Report, which is written once, after the last stage.

    preflight -> data -> backdoor_poison -> train -> backdoor_defend -> evaluate -> robustness -> audit
    -> save_model -> register -> (write report.json, model_card.md, security_report.md, metrics, plots)

The train stage hands the same inputs to one of three trainers (central, data-parallel, federated); every later
stage that needs a fresh model asks the run's model factory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aisec_train.audit.registry import resolve_registry_path
from aisec_train.audit.stage import stage_audit, stage_register
from aisec_train.backdoor.stage import stage_defend, stage_poison
from aisec_train.components import check_target
from aisec_train.config import Config
from aisec_train.data.dataset import load_dataset
from aisec_train.data.items import check_finite_split, check_items
from aisec_train.data.manifest import summary
from aisec_train.data.sanity import check_training_split
from aisec_train.models.factory import ModelFactory, check_model_config
from aisec_train.models.finetune import KEYS as FINETUNE_KEYS
from aisec_train.models.finetune import check_adapters_moved
from aisec_train.preflight import check_limits, check_outputs
from aisec_train.privacy import LedgerStore, check_delta, claims, resolve_store_path
from aisec_train.privacy.randomness import describe as describe_randomness
from aisec_train.privacy.record_sets import register_and_share
from aisec_train.privacy.spend import DatasetSpend, new_spend, store_record
from aisec_train.report import outputs, security_report
from aisec_train.report.budget_text import records_spent, stop_line
from aisec_train.report.report import Report
from aisec_train.run_state import Run, UserObjects
from aisec_train.store import IntegrityError, lock_run_dir, validate_output_path
from aisec_train.text_run import is_text, skip_robustness, text_sanity
from aisec_train.tracking import finish_tracking, run_info, tracking
from aisec_train.train import checkpoint
from aisec_train.train.config import PrivacyMode
from aisec_train.train.launch import WORKER_STAGES, env_rank
from aisec_train.train.loop import TrainResult, accuracy, resolve_device
from aisec_train.train.objectives import objective_from_config
from aisec_train.train.precision import check_precision
from aisec_train.train.trainers import TRAINERS, TrainJob, select_trainer

log = logging.getLogger("aisec_train")


def preflight(cfg: Config, user: UserObjects) -> None:
    """Every check that needs no data: component targets importable, arguments their constructors take, and the
    registry and ledger store writable without following a symlink."""
    if user.model is None:
        check_model_config(cfg.model)
    for name, given in (("train_dataset", user.train), ("test_dataset", user.test)):
        if given is not None:  # the Python API's own datasets: every item's kind, before anything reads them in bulk
            check_items(given, name, min_items=2 if name == "train_dataset" else 1)
    check_target(cfg.optimizer, "optimizer", supplied=("params",))
    if cfg.scheduler:
        check_target(cfg.scheduler, "scheduler", supplied=("optimizer", "T_max", "total_steps", "total_iters"))
    if user.train is None and cfg.dataset.name == "custom":
        for key in ("train", "test"):
            node = getattr(cfg.dataset, key)
            if node is not None and node.get("_target_") is not None:
                check_target(node, f"dataset.{key}")
    check_precision(cfg.train.precision, resolve_device(cfg.train.device), cfg.privacy.mode is PrivacyMode.dpsgd)
    check_limits(cfg)  # float32 range, accountant and resource limits (preflight.py)
    registry = resolve_registry_path(cfg.audit.registry_path)
    validate_output_path(registry, what="audit.registry_path")
    store = resolve_store_path(cfg.privacy.ledger_store, registry_path=str(registry))
    validate_output_path(store / "probe.json", what="privacy.ledger_store")


def refuse_symlinks(run_dir: Path) -> None:
    """Before any work: a symlink anywhere in the run directory is refused (every file a run writes is created
    inside it, never through a link; the writers check again, this makes the refusal come first)."""
    for folder, dirs, files in os.walk(run_dir, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if path.is_symlink():
                raise IntegrityError(f"{path} is a symlink: aisec-train never writes through one; remove it")


def _open_spend(run: Run, run_id: str | None = None) -> DatasetSpend | None:
    """Under DP: the dataset's ledger, locked for the rest of the run (a second job on the same data waits up to
    ``train.lock_wait_s`` or refuses), and the run's account in it (``run_id``: default the run directory; the
    Python API's ``train`` passes its own)."""
    cfg, data = run.cfg, run.data
    assert data is not None
    if cfg.privacy.mode is not PrivacyMode.dpsgd:  # no DP, no delta to check and nothing to charge
        return None
    if env_rank() != 0:  # torchrun: rank 0 alone charges the job's one ledger
        return None
    override = check_delta(cfg.privacy.delta, len(data.train), reason=cfg.privacy.delta_reason)
    run_id = run_id or str(run.run_dir.resolve())
    store = LedgerStore(cfg.privacy.ledger_store, run_id=run_id)  # the user's, the team's ($AISEC_...) or scratch
    store.validate(data.manifest_sha256)
    ledger = run.resources.enter_context(store.open(data.manifest_sha256, wait=cfg.train.lock_wait_s))
    run.report.add("privacy", **store_record(store), delta_override=cfg.privacy.delta_reason if override else None)
    spend = new_spend(cfg, ledger.delegate(), run_id, data.split_seed, len(data.train))
    if data.record_digests is not None:  # charged by records too, whatever file, order or dtype held them
        spend.shared = register_and_share(ledger, data.record_digests)
    return spend


def stage_data(run: Run) -> None:
    cfg = run.cfg
    run.device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.dataset, seed=cfg.train.seed, train=run.user.train, test=run.user.test)
    check_finite_split(data.test, "the test split")  # scores on it are reported: NaN there is refused too
    text_evidence = None
    if is_text(data):  # token ids: the pixel checks do not apply (text_run.py says which ran)
        sanity, text_evidence = text_sanity(data)
    else:
        sanity = check_training_split(
            data.train,
            data.num_classes,
            cfg.dataset.outlier_z,
            max_samples=cfg.dataset.sanity_samples,
            seed=data.split_seed,
        )
    data.record("sanity_checks", findings=len(sanity["findings"]), coverage=sanity["coverage"])
    run.data = data
    run.spend = _open_spend(run)
    normalize = cfg.dataset.normalize
    run.factory = ModelFactory(
        None if run.user.model is not None else cfg.model,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        private=cfg.privacy.mode is PrivacyMode.dpsgd,
        normalize=(normalize.mean, normalize.std) if normalize.mean is not None else None,
        template=run.user.model,
        device=str(run.device),
        template_tuning={k: v for k, v in cfg.model.items() if k in FINETUNE_KEYS}
        if run.user.model is not None
        else None,
    )
    run.factory.check()  # the model takes these images and returns one logit per class, before any training
    if len(data.manifest["files"]) > 100:
        outputs.write_json(data.manifest, run.run_dir / "data_manifest.json")
    run.report.add(
        "data",
        name=data.name,
        manifest_sha256=data.manifest_sha256,
        manifest=summary(data.manifest),
        n_train=len(data.train),
        n_test=len(data.test),
        duplicates_removed=data.duplicates_removed,
        records=data.records_summary(),
        num_classes=data.num_classes,
        shape=list(data.input_shape),
        split_seed=data.split_seed,
        augmentation=[s for s in data.lineage if s["step"] == "augment"],
        sanity=sanity,
    )
    run.report.add("model", **run.factory.describe())
    pinned = cfg.dataset.sha256 is not None
    run.report.check(
        "data pipeline",
        "data integrity verified against a pinned hash",
        "pass" if pinned else "fail",
        f"manifest SHA-256 {data.manifest_sha256}"
        + (" matched dataset.sha256" if pinned else "; no dataset.sha256 pin was given, so nothing was verified"),
        fix=f"aisec-train dataset.sha256={data.manifest_sha256} (with this run's other overrides)",
    )
    coverage = sanity["coverage"]
    findings = sanity["findings"]
    if text_evidence is not None:  # not "pass": the criterion's pixel checks did not run
        run.report.check(
            "data pipeline",
            "sanity checks before training (NaN/inf, range, labels, balance, duplicates, outliers)",
            "not_applicable",
            text_evidence,
        )
        return
    run.report.check(
        "data pipeline",
        "sanity checks before training (NaN/inf, range, labels, balance, duplicates, outliers)",
        "pass",
        f"{len(findings)} finding(s): {', '.join(f['check'] for f in findings) or 'none'}; streamed over "
        + ("every training sample" if coverage["mode"] == "all" else f"a seeded sample of {coverage['checked']}")
        + f" of {coverage['of']} (labels: all)",
    )


def _model_identity(run: Run) -> dict[str, Any]:
    assert run.factory is not None
    return {
        "target": run.factory.target,
        "arguments": {k: v for k, v in (run.factory.spec or {}).items() if k[0] != "_"},
    }


def _load_resume(run: Run) -> dict[str, Any] | None:
    if not run.checkpoint_path.exists():
        return None
    payload = checkpoint.load(run.checkpoint_path, root=run.run_dir)
    meta, data = payload.get("meta", {}), run.data
    assert data is not None
    identity = _model_identity(run)
    if meta.get("manifest_sha256") != data.manifest_sha256 or meta.get("model") != identity:
        raise checkpoint.CheckpointError(
            f"{run.run_dir} holds a run of model {meta.get('model')} on data {meta.get('manifest_sha256')}; "
            f"this config trains {identity} on {data.manifest_sha256}. Use another hydra.run.dir"
        )
    if meta.get("split_seed", data.split_seed) != data.split_seed:
        raise checkpoint.CheckpointError(
            f"train.seed={run.cfg.train.seed} draws train/test split {data.split_seed}, but {run.run_dir} was "
            f"trained on split {meta.get('split_seed')}: resuming would turn training records into held-out ones. "
            "Keep the seed (or set dataset.split_seed), or use another hydra.run.dir"
        )
    if run.spend is not None:  # delta, accountant and split recorded in the dataset ledger must not move either
        privacy = run.cfg.privacy
        run.spend.ledger.check_invariants(
            run.spend.run_id, delta=privacy.delta, accountant=privacy.accountant.value, split_seed=data.split_seed
        )
    if meta.get("private") != (run.cfg.privacy.mode is PrivacyMode.dpsgd):
        raise checkpoint.CheckpointError(
            f"{run.run_dir} was trained with privacy={'dpsgd' if meta.get('private') else 'none'}; "
            "privacy cannot be switched on resume. Use another hydra.run.dir"
        )
    log.info("resuming %s from epoch %d", run.checkpoint_path, payload["epoch"])
    return payload


class CheckpointSlot:
    """Writes a checkpoint payload with the run's identity (picklable: data-parallel rank 0 calls it)."""

    def __init__(self, path: Path, meta: dict[str, Any], root: Path):
        self.path, self.meta, self.root = path, meta, root

    def __call__(self, payload: dict[str, Any]) -> None:
        checkpoint.save({**payload, "meta": self.meta}, self.path, root=self.root)


def stage_train(run: Run) -> None:
    cfg, data = run.cfg, run.data
    assert data is not None and run.factory is not None
    resume = _load_resume(run)
    meta = {"manifest_sha256": data.manifest_sha256, "model": _model_identity(run)}
    meta["private"] = cfg.privacy.mode is PrivacyMode.dpsgd
    meta["split_seed"] = data.split_seed
    trainer = select_trainer(cfg)
    objective = objective_from_config(cfg.robustness)
    slot = CheckpointSlot(run.checkpoint_path, meta, run.run_dir)
    job = TrainJob(run.factory, data, cfg, run.device, objective, run.run_dir, resume, slot)
    job.report, job.spend = run.report, run.spend
    job.extras["tracker"] = run.tracker
    if run.backdoor is not None:
        job.extras["backdoor"] = run.backdoor
    result = TRAINERS[trainer](job)
    run.model, run.result = result.model, result
    adapters = check_adapters_moved(run.model)  # LoRA that never trained is refused, not released (opacus#820)
    if adapters is not None:
        run.report.add("model", lora_adapters=adapters)
    run.tracker.log_history(result.history, "round" if trainer == "federated" else "epoch")  # not logged live
    run.report.add(
        "train",
        trainer=trainer,
        objective=objective.name,
        epochs_completed=result.history[-1]["epoch"] if result.history else 0,
        epochs_planned=cfg.train.epochs,
        resumed_from_epoch=resume["epoch"] if resume else None,
        stopped_by_budget=result.stopped_by_budget,
        device=str(run.device),
        adversarial_training=cfg.robustness.mode.value,
        augmult=cfg.train.augmult,  # views per record in each clipped gradient (train/augmult.py)
        precision=cfg.train.precision,
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        world_size=result.world_size,
        distributed=result.distributed,
    )
    if run.checkpoint_path.exists():
        run.report.add(
            "train",
            checkpoint=str(run.checkpoint_path.relative_to(run.run_dir)),
            checkpoint_sha256=checkpoint.recorded_hash(run.checkpoint_path),
        )
    _report_privacy(run, result)
    if stop_line(run.report):  # never a silent stop: the console, model card and security report all say it
        log.warning("%s", stop_line(run.report))


def _report_privacy(run: Run, result: TrainResult) -> None:
    cfg = run.cfg.privacy
    if result.ledger is None:
        if run.report.get("privacy.epsilon") is not None:  # the federated trainer reported client-level privacy
            return
        run.report.add("privacy", **dict.fromkeys(["epsilon", "delta", "noise_multiplier", "sample_rate", "steps"]))
        run.report.add("privacy", accountant=None, mode=run.report.get("privacy.mode") or "none")
        if run.report.get("privacy.mode") in (None, "none"):
            run.report.check(
                "training", "differentially private training (DP-SGD)", "fail", "privacy=none: no DP guarantee"
            )
        return
    summary_ = result.ledger.summary()
    run.report.add(
        "privacy",
        **summary_,
        mode="dpsgd",
        target_epsilon=cfg.target_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        grad_sample_mode=result.grad_sample_mode,
        private_step=result.private_step,
        poisson_sampling=cfg.poisson_sampling,
    )
    if run.spend is not None:  # the dataset-level account: every run on the same data, composed
        run.report.add("privacy", budget=run.spend.summary())
    within = cfg.target_epsilon is None or summary_["epsilon"] <= cfg.target_epsilon + 1e-9
    gaps = claims.guarantee_gaps(cfg, len(run.data.train))  # reproducible noise, delta >= 1/n: no guarantee
    run.report.add("privacy", randomness=describe_randomness(cfg, run.cfg.train.seed), guarantee=claims.guarantee(gaps))
    status, evidence = claims.dp_item(
        within,
        f"({summary_['epsilon']:.3f}, {summary_['delta']:g})-DP by the {summary_['accountant']} accountant over "
        f"{summary_['steps']} steps, noise multiplier {summary_['noise_multiplier']:.3f}, sample rate "
        f"{summary_['sample_rate']:.4f}, clip {cfg.max_grad_norm}; target epsilon {cfg.target_epsilon}"
        + records_spent(run.report),
        gaps,
    )
    run.report.check("training", "differentially private training (DP-SGD)", status, evidence)


def stage_evaluate(run: Run) -> None:
    assert run.model is not None and run.data is not None
    clean = accuracy(run.model, run.data.test, run.device, workers=run.cfg.dataset.workers)
    run.report.add("metrics", clean_accuracy=clean, n_test=len(run.data.test))


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
    clean = run.report.get("metrics.clean_accuracy")
    figures = ", ".join(
        f"{name} {e['robust_accuracy']:.3f}" if "robust_accuracy" in e else f"{name} skipped ({e['skipped']})"
        for name, e in per_attack.items()
    )
    completed = any("robust_accuracy" in e for e in per_attack.values())  # the criterion: an attack measured it
    run.report.check(
        "model",
        EVASION,
        "pass" if completed else "fail",
        f"{rob.eval} suite ({a.norm.value}, eps {a.eps:.4g}) on {len(x)} test samples: robust accuracy "
        f"{result['robust_accuracy']:.3f} (95% CI {result['robust_accuracy_ci'][0]:.3f}-"
        f"{result['robust_accuracy_ci'][1]:.3f}) vs clean {clean:.3f}; after each attack (cascade): {figures}",
    )
    masking = result["gradient_masking"]
    run.report.check(
        "model",
        MASKING,
        "fail" if masking["flagged"] else "pass",
        "; ".join(masking["reasons"])
        if masking["flagged"]
        else "no sign of masking: black-box Square found no "
        "example the white-box attacks missed, more steps did not raise robust accuracy, no zero input gradients",
    )


EVASION = "tested against evasion attacks"
MASKING = "robust accuracy not inflated by gradient masking"


def stage_save_model(run: Run) -> None:
    """model.pt: the released weights (refused when non-finite), hashed; the registry stage reads it."""
    import torch

    assert run.model is not None
    state = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        from aisec_train.train.callbacks import NonFiniteError

        raise NonFiniteError(f"the final model has non-finite weights {bad[:3]}; model.pt is not written")
    from aisec_train.audit.monitor import recipe

    assert run.factory is not None  # the keyed tag records how to rebuild the model (aisec-train-monitor)
    from aisec_train.audit.registry import run_claims

    claims = run_claims(run.report.to_dict(), run.run_dir)  # its data and privacy, for the registry to hold it to
    meta = {"model": recipe(run.factory), "run": claims}
    digest = checkpoint.save(state, run.run_dir / "model.pt", root=run.run_dir, meta=meta)
    run.report.add("model", path="model.pt", sha256=digest)
    run.report.check(
        "model",
        "checkpoint hashed and verified before loading",
        "pass",
        f"model.pt SHA-256 {digest}; checkpoints are written atomically and loaded with weights_only=True "
        "after their hash is verified",
    )


def write_reports(run: Run) -> None:
    """Every report file, once, after the last stage."""
    assert run.data is not None
    run.report.stage = "outputs"
    run.report.check(
        "data pipeline", "data lineage recorded", "pass", " -> ".join(step["step"] for step in run.data.lineage)
    )
    run.report.add("data", lineage=run.data.lineage)
    # stage_seconds: each stage's wall time (timings: the same numbers, the name older readers use)
    run.report.add("run", experiment=run.experiment, timings=run.timings, stage_seconds=dict(run.timings))
    outputs.write_all(run.report, run.result.history if run.result else [], run.run_dir)
    security_report.write(run.report, run.run_dir)


Stage = Callable[[Run], None]
# The run, top to bottom. A stage that does not apply to this config returns at once (and says so in
# the report); each threat's stage lives in its own package.
STAGES: list[tuple[str, Stage]] = [
    ("data", stage_data),
    ("backdoor_poison", stage_poison),  # BadNets red team: poisons the training split (or malicious clients' shards)
    ("train", stage_train),  # central, data-parallel or federated trainer
    # Before evaluation, so that every later figure (clean and robust accuracy, audits) is of the released model.
    ("backdoor_defend", stage_defend),  # detection, optional filter, Fine-Pruning
    ("evaluate", stage_evaluate),
    ("robustness", stage_robustness),
    ("audit", stage_audit),  # membership inference, extraction against the guard, monitoring baseline
    ("save_model", stage_save_model),
    ("register", stage_register),  # the verified model.pt into the project's inventory
]


def run_pipeline(cfg: Config, run_dir: Path, experiment: str = "quickstart", user: UserObjects | None = None) -> Report:
    user = user or UserObjects()
    preflight(cfg, user)
    check_outputs(cfg, run_dir)  # every output folder proved writable before a step is charged (preflight.py)
    run = Run(cfg=cfg, run_dir=run_dir, experiment=experiment, user=user)
    with run.resources:  # the run directory's lock (and, under DP, the dataset ledger's) for the whole run
        worker = env_rank() != 0  # a torchrun rank other than 0: loads the data and trains, nothing else
        if not worker:
            run.resources.enter_context(lock_run_dir(run_dir, wait=cfg.train.lock_wait_s))
        refuse_symlinks(run_dir)
        run.tracker = run.resources.enter_context(tracking(cfg, run_info(run_dir, experiment)))  # logger group
        for name, stage in STAGES:
            if worker and name not in WORKER_STAGES:
                continue
            started = time.perf_counter()
            log.info("stage %s", name)
            run.report.stage = name
            stage(run)
            run.timings[name] = round(time.perf_counter() - started, 3)
        if worker:
            return run.report
        write_reports(run)
        finish_tracking(run.tracker, run.report, run_dir)  # headline numbers; report files and model to MLflow
    return run.report


__all__ = ["Run", "STAGES", "run_pipeline"]

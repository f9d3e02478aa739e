"""The train stage of the pipeline: one job, one of three trainers, one report.

The run directory's identity is checked first (train/resume.py: a resume continues this config's run only);
the job (factory, data, config, objective, checkpoint slot) goes to ``TRAINERS[central | data_parallel |
federated]``; the ``train`` section follows, then the ``privacy`` section through its one writer
(privacy/report.py), with what the trainer measured.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aisec_train.models.finetune import check_adapters_moved
from aisec_train.privacy import report as privacy_report
from aisec_train.report.budget_text import stop_line
from aisec_train.robust.config import training_attack
from aisec_train.train import checkpoint
from aisec_train.train.allocator import freed_memory_kept, keep_freed_memory
from aisec_train.train.distributed import weights_digest
from aisec_train.train.loop import TrainResult, check_outputs_finite, evaluate
from aisec_train.train.objectives import objective_from_config
from aisec_train.train.resume import CheckpointSlot, identity, load_resume
from aisec_train.trainers import TRAINERS, TrainJob, select_trainer

if TYPE_CHECKING:
    from aisec_train.run_state import Run

log = logging.getLogger("aisec_train")


def stage_train(run: Run) -> None:
    cfg, data = run.cfg, run.data
    assert data is not None and run.factory is not None
    resume = load_resume(run)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    elif freed_memory_kept():  # the process-wide setting cannot be taken back: say so rather than report false
        log.warning("train.keep_freed_memory=false, but an earlier job in this process kept freed memory: still kept")
    trainer = select_trainer(cfg)
    objective = objective_from_config(cfg.robustness)
    slot = CheckpointSlot(run.checkpoint_path, identity(run), run.run_dir)
    job = TrainJob(run.factory, data, cfg, run.device, objective, run.run_dir, resume, slot, spend=run.spend)
    job.extras["tracker"] = run.tracker
    if run.backdoor is not None:
        job.extras["backdoor"] = run.backdoor
    result = TRAINERS[trainer](job)
    if resume and resume.get("stopped_by_budget") and len(result.history) == len(resume.get("history") or []):
        # A finished run the budget had stopped, resumed: the loop trains nothing (no epoch left) and so never
        # meets the budget again; the model is still the stopped one, and the report, registry and console say so.
        result.stopped_by_budget = True
    if result.stopped_by_budget:
        result.history = trained_rows(result.history)
    run.report.merge(result.sections, result.checks)  # what the trainer measured beyond the loop (federated)
    run.model, run.result = result.model, result
    adapters = check_adapters_moved(run.model)  # LoRA that never trained is refused, not released (opacus#820)
    # A private step drops each record whose forward overflows, so a model its learning rate blew up trains on, on
    # noise alone, with finite weights: refused here, before the backdoor defence or any audit works on it.
    clean, non_finite = evaluate(run.model, data.test, run.device, workers=cfg.dataset.workers)
    check_outputs_finite(non_finite, len(data.test), cfg.train.lr)
    run.test_pass = (weights_digest(run.model), clean, non_finite)
    if adapters is not None:
        run.report.add("model", lora_adapters=adapters)
    run.tracker.log_history(result.history, "round" if trainer == "federated" else "epoch")  # not logged live
    run.report.add(
        "train",
        trainer=trainer,
        objective=objective.name,
        epochs_completed=result.history[-1]["epoch"] if result.history else 0,
        # a federated run's history rows are its rounds (federated/report.py), so its plan is the rounds
        epochs_planned=cfg.federated.rounds if trainer == "federated" else cfg.train.epochs,
        resumed_from_epoch=resume["epoch"] if resume else None,
        # steps an earlier start took after its last checkpoint (then stopped or was killed): charged and counted in
        # privacy.steps and its epsilon, though no checkpoint or model holds them (privacy/spend.py)
        steps_lost_before_resume=run.spend.reconciled if run.spend is not None and resume else 0,
        stopped_by_budget=result.stopped_by_budget,
        device=str(run.device),
        adversarial_training=cfg.robustness.mode.value,
        adversarial_attack=training_attack(cfg.robustness),  # what it ran (FGSM-RS: one step, robust/config.py)
        augmult=cfg.train.augmult,  # views per record in each clipped gradient (train/augmult.py)
        precision=cfg.train.precision,
        keep_freed_memory=freed_memory_kept(),  # whether glibc's malloc keeps freed memory here (train/allocator.py)
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
    privacy_report.write(run.report, measured_privacy(run, result))
    if stop_line(run.report):  # never a silent stop: the console, model card and security report all say it
        log.warning("%s", stop_line(run.report))


def trained_rows(history: list[dict]) -> list[dict]:
    """The history without a last epoch the privacy budget stopped before its first step. The loop records that
    epoch (loss and accuracy 0 over no batch, the step count of the epoch before), and it was reported as trained:
    ``train.epochs_completed``, the security report's "2 epochs" of a run that trained one, metrics.csv, the curve
    and the trackers. Rows carry ``steps`` under DP only, the only runs a budget stops."""
    rows = list(history)
    while len(rows) >= 2 and "steps" in rows[-1] and rows[-1]["steps"] == rows[-2].get("steps"):
        rows.pop()
    return rows


def measured_privacy(run: Run, result: TrainResult) -> privacy_report.Measured | None:
    """What the trainer measured: its own account (the federated trainer's), else its ledger's; None: no DP."""
    if result.privacy is not None:
        return result.privacy
    if result.ledger is None:
        return None
    assert run.data is not None
    budget = run.spend.summary() if run.spend is not None else None  # every run on the same data, composed
    return privacy_report.from_ledger(run.cfg, result, len(run.data.train), budget)

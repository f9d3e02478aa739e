"""A run is a list of named stages; each reads the shared :class:`~aisec_train.run_state.Run`, fills its own slots and
adds a section to the one Report, which is written once, after the last stage.

    preflight -> data -> backdoor_poison -> train -> backdoor_defend -> evaluate -> robustness -> audit
    -> save_model -> register -> (write report.json, model_card.md, security_report.md, metrics, plots)

This module only lists and runs them; each stage lives in the package that owns its concept (``data/stage.py``,
``train/stage.py``, ``backdoor/stage.py``, ``robust/stage.py``, ``audit/stage.py``, ``report/stage.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from aisec_train.audit.registry import resolve_registry_path
from aisec_train.audit.stage import stage_audit, stage_register
from aisec_train.backdoor.stage import stage_defend, stage_poison
from aisec_train.components import check_target
from aisec_train.config import Config
from aisec_train.data.items import check_items
from aisec_train.data.stage import stage_data
from aisec_train.errors import Stopped
from aisec_train.models.factory import check_model_config
from aisec_train.preflight import check_limits, check_outputs, check_state_paths, refuse_symlinks
from aisec_train.privacy import resolve_store_path
from aisec_train.report.report import Report
from aisec_train.report.stage import stage_save_model, write_reports
from aisec_train.robust.config import check_backend
from aisec_train.robust.stage import stage_evaluate, stage_robustness
from aisec_train.run_state import Run, UserObjects
from aisec_train.store import lock_run_dir, validate_output_path
from aisec_train.tracking import finish_tracking, run_info, tracking
from aisec_train.train.config import PrivacyMode
from aisec_train.train.launch import WORKER_STAGES, env_rank
from aisec_train.train.loop import resolve_device
from aisec_train.train.precision import check_precision
from aisec_train.train.stage import stage_train

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
    check_backend(cfg.robustness.backend, resolve_device(cfg.train.device))  # robust/config.py
    check_limits(cfg)  # float32 range, accountant and resource limits (preflight.py)
    registry = resolve_registry_path(cfg.audit.registry_path)
    store = resolve_store_path(cfg.privacy.ledger_store)  # refused state paths first: before any folder is made
    check_state_paths()
    validate_output_path(registry, what="audit.registry_path")
    validate_output_path(store / "probe.json", what="privacy.ledger_store")


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
        # each stage's CPU seconds (this process, all threads): unlike wall seconds, other jobs' load leaves them be
        cpu_seconds: dict[str, float] = {}
        run.report.add("run", stage_cpu_seconds=cpu_seconds)
        trained = False
        for name, stage in STAGES:
            if worker and name not in WORKER_STAGES:
                continue
            started, cpu_started = time.perf_counter(), time.process_time()
            log.info("stage %s", name)
            run.report.stage = name
            try:
                stage(run)
            except Stopped as err:  # a signal (cli.py): the one line says where, if the training loop did not
                err.where = err.where or f" in stage {name}" + (", after training" if trained else "")
                raise
            trained = trained or name == "train"
            run.timings[name] = round(time.perf_counter() - started, 3)
            cpu_seconds[name] = round(time.process_time() - cpu_started, 3)
        if worker:
            return run.report
        write_reports(run)
        finish_tracking(run.tracker, run.report, run_dir)  # headline numbers; report files and model to MLflow
    return run.report


__all__ = ["Run", "STAGES", "run_pipeline"]

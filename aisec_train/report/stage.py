"""The output stages of the pipeline: ``save_model`` (model.pt, before the registry stage reads it) and
:func:`write_reports` (every report file, once, after the last stage).

    save_model:    finite weights only -> model.pt with its keyed tag (how to rebuild the model, the run's data
                   and privacy claims) -> ``model.path``, ``model.sha256``, the checkpoint checklist item
    write_reports: lineage item, run timings -> report.json, model_card.md, metrics.csv, plots,
                   security_report.md

Like every ``stage.py``, this module sits above the packages: it may import any of them (audit's monitor recipe
and registry claims, train's checkpoint), and only ``pipeline.py`` imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from aisec_train.audit.monitor import recipe
from aisec_train.audit.registry import run_claims
from aisec_train.report import outputs, security_report
from aisec_train.train import checkpoint
from aisec_train.train.callbacks import NonFiniteError

if TYPE_CHECKING:
    from aisec_train.run_state import Run


def stage_save_model(run: Run) -> None:
    """model.pt: the released weights (refused when non-finite), hashed; the registry stage reads it."""
    assert run.model is not None
    state = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteError(f"the final model has non-finite weights {bad[:3]}; model.pt is not written")
    assert run.factory is not None  # the keyed tag records how to rebuild the model (aisec-train-monitor)
    claims = run_claims(run.report.to_dict(), run.run_dir)  # its data and privacy, for the registry to hold it to
    meta = {"model": recipe(run.factory), "run": claims}
    if run.report.get("monitoring.baseline_sha256"):  # aisec-train-monitor refuses a baseline edited after this
        meta["monitor_baseline_sha256"] = run.report.get("monitoring.baseline_sha256")
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

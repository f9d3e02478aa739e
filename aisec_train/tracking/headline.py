"""The report's headline numbers for trackers: every number at most three levels deep in its sections
(``metrics.clean_accuracy``, ``privacy.epsilon``, ``audit.membership.auc``, ...) and the checklist's tallies;
per-layer detail deeper down stays in report.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from aisec_train.report.report import Report

DEPTH = 3
SKIPPED = ("data.manifest", "privacy.private_step", "train.distributed", "model.")  # identities, not figures
REPORT_FILES = ("report.json", "model_card.md", "security_report.md", "metrics.csv")


def headline(report: Report) -> dict[str, float]:
    out: dict[str, float] = {}
    for section, values in report.sections.items():
        _walk(values, section, 1, out)
    for status in ("pass", "fail", "not_applicable"):
        out[f"checklist.{status}"] = float(sum(1 for c in report.checklist if c["status"] == status))
    return out


def _walk(node: Any, prefix: str, depth: int, out: dict[str, float]) -> None:
    if prefix.startswith(SKIPPED):
        return
    if isinstance(node, dict) and depth <= DEPTH:
        for key, value in node.items():
            _walk(value, f"{prefix}.{key}", depth + 1, out)
    elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
        out[prefix] = float(node)


def run_files(run_dir: Path) -> dict[str, Path]:
    """The files MLflow receives as artifacts: the reports, the model card and the model."""
    files = {name: run_dir / name for name in REPORT_FILES}
    files["model"] = run_dir / "model.pt"
    return {name: path for name, path in files.items() if path.is_file() and not path.is_symlink()}

"""One Report object that every pipeline stage adds a section to, written once as report.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aisec_train.report.criteria import lookup

Status = Literal["pass", "fail", "not_applicable"]
AREAS = ("data pipeline", "training", "model", "deployment", "monitoring")


@dataclass
class Report:
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    checklist: list[dict[str, Any]] = field(default_factory=list)
    stage: str = ""  # the pipeline stage now running: it owns the checklist items it answers
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, section: str, **values: Any) -> None:
        self.sections.setdefault(section, {}).update(values)

    def check(
        self,
        area: str,
        item: str,
        status: Status,
        evidence: str,
        *,
        criterion: str | None = None,
        fix: str | None = None,
    ) -> None:
        """Answer one checklist item with the evidence measured in this run.

        Each item states its criterion (what "pass" certifies) and each "fail" the override or command that
        fixes it: both default to the item's entry in report/criteria.py; an item with neither is a bug.
        A stage may revise its own answer; answering an item another stage owns is a bug (it would hide what
        that stage measured), so it raises.
        """
        if area not in AREAS:
            raise ValueError(f"checklist area {area!r} is not one of {AREAS}")
        known = lookup(item)
        criterion = criterion or (known.criterion if known else None)
        if not criterion:
            raise ValueError(f"checklist item {item!r} states no criterion: add it to aisec_train/report/criteria.py")
        fix = (fix or (known.fix if known else None)) if status == "fail" else None
        if status == "fail" and not fix:
            raise ValueError(f"checklist item {item!r} fails without a fix: pass fix= or add it to report/criteria.py")
        owner = self.owners.setdefault((area, item), self.stage)
        if owner != self.stage:
            raise RuntimeError(
                f"checklist item {item!r} belongs to stage {owner!r}; stage {self.stage!r} cannot set it"
            )
        self.checklist = [c for c in self.checklist if (c["area"], c["item"]) != (area, item)]
        entry = {"area": area, "item": item, "status": status, "criterion": criterion, "evidence": evidence}
        self.checklist.append({**entry, "fix": fix})

    def merge(self, sections: dict[str, dict[str, Any]], checklist: list[dict[str, Any]]) -> None:
        """Add what a part of the run measured on its own (a trainer's ``TrainResult.sections`` / ``checks``, kept
        in a Report of its own), as if it had written here: same keys, same answers, owned by the current stage."""
        for name, values in sections.items():
            self.add(name, **values)
        for c in checklist:
            self.check(c["area"], c["item"], c["status"], c["evidence"], criterion=c["criterion"], fix=c["fix"])

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.sections
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        return {**self.sections, "checklist": self.checklist}

    def write(self, path: Path) -> None:
        """Write atomically inside the run directory, never through a symlink: a crash mid-write leaves the
        previous report intact."""
        from aisec_train.store import atomic_write

        atomic_write(path, json.dumps(json_safe(self.to_dict()), indent=2, sort_keys=False), root=path.parent)


def json_safe(value: Any) -> Any:
    """JSON has no NaN or inf: write them as null so every reader can parse the report."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

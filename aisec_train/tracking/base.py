"""What every tracker backend implements, and the fan-out that feeds them all.

A backend receives four kinds of records: the flattened config once (``log_params``), metrics along an axis
(``log_metrics(values, step, axis)`` with axis ``step``, ``epoch`` or ``round``; keys are ``axis/name``), the
report's headline numbers and files at the end (``finish``), and ``close(ok)``. :class:`Tracker` sends each
record to every enabled backend; with none enabled it does nothing, so callers never check.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class RunInfo:
    """Where and as what the run is tracked (tracking/context.py fills it from the run and Hydra)."""

    run_dir: Path
    run_name: str  # the run directory's name, or a multirun job's number
    experiment: str  # the Hydra experiment preset (quickstart, backdoor, ...)
    sweep_dir: Path | None = None  # a multirun's sweep directory: its jobs are grouped as one experiment
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> str | None:
        return str(self.sweep_dir) if self.sweep_dir is not None else None

    @property
    def store_dir(self) -> Path:
        """Where a shared local store lives: the sweep directory of a multirun, else the run directory."""
        return self.sweep_dir if self.sweep_dir is not None else self.run_dir


class Backend(Protocol):
    name: str

    def log_params(self, params: dict[str, Any]) -> None: ...

    # The tracking child's backends also take ``wall_time`` (the training process's clock when it logged).
    def log_metrics(self, values: dict[str, float], step: int, axis: str) -> None: ...

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None: ...

    def close(self, ok: bool) -> None: ...


class Tracker:
    """The fan-out: every record to every backend. ``Tracker([])`` is the no-op tracker (``logger=none``)."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends
        self.logged: dict[str, int] = {}  # the last step logged per axis: history replayed later skips these

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log_params(self, params: dict[str, Any]) -> None:
        for backend in self.backends:
            backend.log_params(params)

    def log_metrics(self, values: dict[str, Any], step: int, axis: str = "step") -> None:
        clean = {f"{axis}/{k}": float(v) for k, v in values.items() if _number(v)}
        if not self.backends or not clean:
            return
        self.logged[axis] = max(step, self.logged.get(axis, 0))
        for backend in self.backends:
            backend.log_metrics(clean, step, axis)

    def log_history(self, rows: list[dict[str, Any]], axis: str) -> None:
        """Per-epoch (or per-round) rows not logged live (a data-parallel or federated trainer ran elsewhere)."""
        for row in rows:
            step = int(row.get("epoch", 0))
            if step > self.logged.get(axis, 0):
                self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step, axis)

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        final = {f"final/{k}": v for k, v in headline.items()}
        for backend in self.backends:
            backend.finish(final, files)

    def close(self, ok: bool) -> None:
        """Every backend is closed even if one fails; the first failure is raised after, unless the run is
        already failing (then the run's own error is the one to see)."""
        errors = []
        for backend in self.backends:
            try:
                backend.close(ok)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other backends are closed
                errors.append(err)
        if errors and ok:
            raise errors[0]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config (dataclasses, dicts, enums, lists) as ``{"train.lr": 0.5, ...}``; leaves stay scalars or text."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, enum.Enum):
        node = node.value
    if isinstance(node, (list, tuple)):
        node = str(list(node))
    return {prefix.rstrip("."): node}

"""What every tracker backend implements, and the fan-out that feeds them all.

A backend receives four kinds of records: the flattened config once (``log_params``), metrics along an axis
(``log_metrics(values, step, axis)`` with axis ``step``, ``epoch`` or ``round``; keys are ``axis/name``), the
report's headline numbers and files at the end (``finish``), and ``close(ok)``. :class:`Tracker` sends each
record to every enabled backend; with none enabled it does nothing, so callers never check.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("aisec_train")


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

    # Optional: creates the backend's files or remote run. Called at the first figure (or a successful close), never
    # at construction: a run refused before its first step (a spent budget, a resume that changes the mechanism)
    # leaves no tracking folder, no failed MLflow run, and the params of the run it would have resumed untouched.
    def start(self) -> None: ...

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
        self.params: dict[str, Any] | None = None  # held until the backends start (Backend.start)
        self.started = False
        self.failures: list[Exception] = []  # backends that failed mid-run (dropped), raised at close

    def _each(self, call: Callable[[Backend], None]) -> None:
        """``call`` on every backend. One that fails is dropped and its failure kept for ``close``: a tracker (a
        tracking server down, its child killed) must not stop the training. The run used to end at once, its DP
        budget spent on the steps taken, with no model and no report."""
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as err:  # noqa: BLE001 - raised at close, once the run's report and model are written
                self.backends.remove(backend)
                self.failures.append(err)
                log.warning("%s; the run goes on without it, and ends with this error", err)

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log_params(self, params: dict[str, Any]) -> None:
        self.params = params
        if self.started:
            self._each(lambda backend: backend.log_params(params))

    def _start(self) -> None:
        """At the first figure: every backend creates its store, then receives the params held so far."""
        if self.started:
            return
        self.started = True

        def start(backend: Backend) -> None:
            if hasattr(backend, "start"):  # optional: a sink with nothing to create has none
                backend.start()
            if self.params is not None:
                backend.log_params(self.params)

        self._each(start)

    def log_metrics(self, values: dict[str, Any], step: int, axis: str = "step") -> None:
        clean = {f"{axis}/{k}": float(v) for k, v in values.items() if _number(v)}
        if not self.backends or not clean:
            return
        self._start()
        self.logged[axis] = max(step, self.logged.get(axis, 0))
        self._each(lambda backend: backend.log_metrics(clean, step, axis))

    def log_history(self, rows: list[dict[str, Any]], axis: str) -> None:
        """Per-epoch (or per-round) rows not logged live (a data-parallel or federated trainer ran elsewhere)."""
        for row in rows:
            step = int(row.get("epoch", 0))
            if step > self.logged.get(axis, 0):
                self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step, axis)

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        final = {f"final/{k}": v for k, v in headline.items()}
        self._start()
        self._each(lambda backend: backend.finish(final, files))

    def close(self, ok: bool) -> None:
        """Every backend is closed even if one fails; the first failure is raised after, unless the run is
        already failing (then the run's own error is the one to see). A run that ends well starts any backend
        not started yet (a run with no figure still has its run in the store); one that fails first does not.
        A backend that failed mid-run is the first failure."""
        if ok and self.backends:
            self._start()
        errors = self.failures
        for backend in self.backends:
            try:
                backend.close(ok)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other backends are closed
                errors.append(err)
        if errors and ok:
            raise errors[0]


# What the run itself (and the other trackers' fixed stores) writes at the top of its directory. A tracker path
# that is one of them, or inside one, is refused: logger.csv.path=metrics.csv lost every tracker row to the report's
# own metrics.csv, and logger.tensorboard.log_dir=model.pt made model.pt a folder, so the run failed at its end,
# its budget spent.
RUN_OUTPUTS = frozenset({
    ".aisec-train.lock", ".hydra", "cli.log", "checkpoints", "client_keys", "client_state", "federated", "model.pt",
    "model.pt.tag", "model.pt.sha256", "report.json", "model_card.md", "security_report.md", "metrics.csv",
    "data_manifest.json", "monitor_baseline.json", "training_curve.png", "membership_roc.png", "fine_pruning.png",
    "federated_accuracy.png", "mlflow.db", "mlartifacts",
})  # fmt: skip


def check_output_path(path: Path, root: Path, what: str) -> Path:
    """Where a backend will write, checked before any work without creating anything (a refused run leaves no
    folder): inside ``root``, not ``root`` itself nor one of the run's own outputs, and no symlink, and no file
    where a folder goes, on the way. The writer checks again, without following links, when it creates it
    (store.validate_output_path)."""
    from aisec_train.errors import ConfigError
    from aisec_train.store import IntegrityError

    root, path = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    if path == root or root not in path.parents:
        where = f"the directory {root} itself, not a file inside it" if path == root else f"outside {root}"
        raise IntegrityError(f"{what}: {path} is {where}; a run writes only inside its own directory")
    first = path.relative_to(root).parts[0]
    if first in RUN_OUTPUTS:
        raise ConfigError(
            f"{what}: {path} is not allowed: {first} is the run's own (or another tracker's); a tracker writes in "
            "a folder of its own (the defaults: tracking/metrics.csv, tensorboard)"
        )
    at = root
    for name in path.relative_to(root).parts:
        at = at / name
        if at.is_symlink():
            raise IntegrityError(f"{what}: {at} is a symlink: aisec-train never writes through one; remove it")
        if at != path and at.exists() and not at.is_dir():
            raise IntegrityError(f"{what}: {at} is a file, not a folder")
    if path.is_dir():
        raise IntegrityError(f"{what}: {path} is a directory; a file was expected")
    return path


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# scheme://user:password@host: a URL's credentials (an MLflow database or server URI with its login). Greedy up to
# the authority's last "@", so a password holding an "@" is hidden whole.
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a tracker receives, without a URL's credentials: a tracking server shows them to everyone who
    reads the experiment (``logger.mlflow.tracking_uri=postgresql://user:secret@db/mlflow`` logs as ``***@db``)."""
    return {k: _CREDENTIALS.sub(r"\1***@", v) if isinstance(v, str) else v for k, v in params.items()}


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

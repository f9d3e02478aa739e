"""``logger=mlflow``: through ``MlflowClient`` (no global active run, so the API and tests can nest runs).

The default store is ``sqlite:///<dir>/mlflow.db`` (MLflow 3 refuses new file stores) with artifacts beside it in
``<dir>/mlartifacts``; ``<dir>`` is the sweep directory of a multirun, whose jobs are one experiment named after it.
Metrics are buffered and sent in batches (one database transaction per epoch, not per step). Runs in the tracking
child process (tracking/sidecar.py).

A new store is a copy of an empty one, migrated once per MLflow version into the user's cache folder: MLflow's
schema migrations (alembic) take about ten CPU seconds per new database, which a 2-core machine's training felt
even from a child process. MLflow verifies the copy's schema version when it opens it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aisec_train.errors import ConfigError
from aisec_train.store import IntegrityError
from aisec_train.store.files import create_exclusive
from aisec_train.tracking.base import RunInfo
from aisec_train.tracking.config import MlflowLoggerConfig

# The schemes MLflow's tracking store registry maps to a store (mlflow.tracking._tracking_service.utils).
STORE_SCHEMES = {"", "file", "http", "https", "databricks", "databricks-uc", "uc", "sqlite", "postgresql", "mysql",
                 "mssql"}  # fmt: skip
MAX_PARAM_CHARS = 6000  # MLflow's limit on one parameter value
BATCH = 1000  # MLflow's limit on metrics per log_batch call


def file_store_refused() -> str | None:
    """The installed MLflow's version when it refuses a filesystem tracking store, else None. MLflow 3.13 made
    that store opt-in (``MLFLOW_ALLOW_FILE_STORE=true``; mlflow/mlflow#23634): a path or ``file://`` URI failed in
    the tracking child, after the budget was charged. Read from the package metadata: importing mlflow takes
    seconds."""
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1"):
        return None
    for dist in ("mlflow", "mlflow-skinny"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        parts = re.match(r"(\d+)\.(\d+)", version)
        return version if parts and (int(parts[1]), int(parts[2])) >= (3, 13) else None
    return None


class MlflowBackend:
    name = "mlflow"
    package = "mlflow"  # mlflow-skinny is enough: aisec-train[tracking] installs that

    @staticmethod
    def check(cfg: MlflowLoggerConfig, info: RunInfo) -> None:
        """Before the child starts (and so before any step): a ``tracking_uri`` whose scheme MLflow has no store
        for. The child would only fail once training had begun. The default store's folder passed the output
        preflight; mlflow itself is not imported here (seconds), so the schemes are MLflow's built-in ones plus
        any a plugin registers (the ``mlflow.tracking_store`` entry points).

        The default store's database and artifact folder are refused when either is a symlink: MLflow writes them
        itself (following links), and a multirun's store lies in the sweep directory, which the run directory's own
        symlink check (preflight.refuse_symlinks) never walks."""
        if cfg.tracking_uri is None:
            for name in ("mlflow.db", "mlartifacts"):
                if (info.store_dir / name).is_symlink():
                    raise IntegrityError(
                        f"logger.mlflow: {info.store_dir / name} is a symlink: aisec-train never writes through one; "
                        "remove it (or set logger.mlflow.tracking_uri)"
                    )
            return
        allowed = sorted(STORE_SCHEMES | plugin_schemes())
        scheme = urlsplit(cfg.tracking_uri).scheme.lower().split("+")[0]  # postgresql+psycopg2: a database driver
        if scheme not in allowed:
            raise ConfigError(
                f"logger.mlflow.tracking_uri={cfg.tracking_uri!r} is not allowed: MLflow has no store for scheme "
                f"{scheme!r}; allowed: a path or {', '.join(s + '://' for s in allowed if s)} "
                "(null: sqlite in the run directory)"
            )
        refusing_version = file_store_refused()
        if scheme in ("", "file") and refusing_version:
            raise ConfigError(
                f"logger.mlflow.tracking_uri={cfg.tracking_uri!r} is not allowed: MLflow {refusing_version} refuses a "
                "filesystem tracking store (a path or file://) unless MLFLOW_ALLOW_FILE_STORE=true, and would only "
                "say so once training had begun; allowed: sqlite:///PATH/mlflow.db, a tracking server (http://, "
                "https://), null (sqlite in the run directory), or MLFLOW_ALLOW_FILE_STORE=true"
            )

    def __init__(self, cfg: MlflowLoggerConfig, info: RunInfo):
        from mlflow.tracking import MlflowClient

        store = info.store_dir.resolve()
        self.uri = cfg.tracking_uri or local_store(store / "mlflow.db", store / "mlartifacts")
        self.client = MlflowClient(self.uri)
        name = cfg.experiment_name or info.group or info.experiment
        self.experiment_id = self._experiment(name, store / "mlartifacts")
        tags = {"aisec_train.run_dir": str(info.run_dir.resolve()), **info.tags}
        self.run_id = self.client.create_run(
            self.experiment_id, run_name=cfg.run_name or info.run_name, tags=tags
        ).info.run_id
        self.log_model, self.pending = cfg.log_model, []

    def _experiment(self, name: str, artifacts: Path) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts.as_uri())
        except MlflowException:  # another job of the same sweep created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit on params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100], synchronous=True)

    def log_metrics(self, values: dict[str, float], step: int, axis: str, wall_time: float | None = None) -> None:
        from mlflow.entities import Metric

        now = int((wall_time or time.time()) * 1000)  # when training measured it (the sidecar's stamp)
        self.pending += [Metric(k, v, now, step) for k, v in values.items()]
        if axis != "step" or len(self.pending) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:BATCH], self.pending[BATCH:]
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        self.log_metrics(headline, 0, "final")  # keys already final/...
        for name, path in files.items():
            if path.is_file() and (name != "model" or self.log_model):
                self.client.log_artifact(self.run_id, str(path), artifact_path="model" if name == "model" else None)

    def close(self, ok: bool) -> None:
        self._flush()
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def plugin_schemes() -> set[str]:
    """Schemes MLflow plugins register for their tracking stores (read from the entry points, nothing imported)."""
    from importlib.metadata import entry_points

    return {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}


def local_store(path: Path, artifacts: Path) -> str:
    """``sqlite:///PATH``, creating PATH as a copy of the cached empty store when it does not exist yet. The copy
    is linked into place, never over an existing file: the first job of a parallel sweep wins, the others use its
    store. The Default experiment's artifact folder is set to this store's (the cache's build folder otherwise)."""
    if not path.exists():
        db = sqlite3.connect(":memory:")  # edited in memory, then created once through the store's safe writes
        try:
            db.deserialize(empty_store().read_bytes())
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", [str(artifacts / "0")])
            db.commit()
            data = db.serialize()
        finally:
            db.close()
        create_exclusive(path, data, root=path.parent, perms=0o666)  # False: a parallel job's store won; use it
    return f"sqlite:///{path}"


def empty_store() -> Path:
    """An empty MLflow store with the installed version's schema, built once into the user's cache folder."""
    import mlflow
    import platformdirs
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    cached = Path(platformdirs.user_cache_dir("aisec-train")) / f"mlflow-{mlflow.__version__}-empty.db"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        staged = cached.with_name(f".{cached.name}.{os.getpid()}")
        staged.unlink(missing_ok=True)
        store = SqlAlchemyStore(f"sqlite:///{staged}", str(cached.parent / "mlartifacts"))  # creates the schema
        store.engine.dispose()
        os.replace(staged, cached)  # whole or absent: concurrent builders each rename a complete store
    return cached

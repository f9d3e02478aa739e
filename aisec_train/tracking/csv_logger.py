"""``logger=csv``: one row per logged value, appended as training goes (readable while the run is going).

Columns ``axis,step,key,value``; the flattened config goes to ``params.json`` beside it. Both live inside the run
directory and are opened without following a symlink. A rerun of the run (a resume) appends; an epoch or round
the file already holds is not written again.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from aisec_train.store import atomic_write, open_live, read_nofollow, validate_output_path
from aisec_train.tracking.base import RunInfo, check_output_path
from aisec_train.tracking.config import CsvLoggerConfig


class CsvBackend:
    name = "csv"

    def __init__(self, cfg: CsvLoggerConfig, info: RunInfo):
        self.root = info.run_dir
        self.path = check_output_path(info.run_dir / cfg.path, info.run_dir, "logger.csv.path")  # nothing created
        self.file: Any = None
        self.logged: dict[str, int] = {}  # per epoch / round axis, the last step the file already holds

    def start(self) -> None:
        self.path = validate_output_path(self.path, root=self.root, what="logger.csv.path")
        fresh = not self.path.exists()
        if not fresh:  # a rerun of the run: its epochs (rounds) from the checkpoint's history are replayed to every
            # tracker (a new MLflow or wandb run wants them), and this file has them already
            for row in csv.DictReader(io.StringIO(read_nofollow(self.path, root=self.root).decode())):
                if row.get("axis") in ("epoch", "round") and (row.get("step") or "").isdigit():
                    self.logged[row["axis"]] = max(int(row["step"]), self.logged.get(row["axis"], 0))
        self.file = open_live(self.path, root=self.root, mode="a")  # appended in place: readable while training
        self.writer = csv.writer(self.file)
        if fresh:  # a resumed run appends to the rows it logged before
            self.writer.writerow(["axis", "step", "key", "value"])

    def log_params(self, params: dict[str, Any]) -> None:
        atomic_write(self.path.with_name("params.json"), json.dumps(params, indent=1, default=str), root=self.root)

    def log_metrics(self, values: dict[str, float], step: int, axis: str) -> None:
        if step <= self.logged.get(axis, 0):
            return
        self.writer.writerows([axis, step, key, repr(value)] for key, value in values.items())
        if axis != "step":  # readable while the run goes on, without a flush per optimizer step
            self.file.flush()

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        self.writer.writerows(["final", 0, key, repr(value)] for key, value in headline.items())

    def close(self, ok: bool) -> None:
        if self.file is not None:  # None: the run ended before its first figure, and left no file
            self.file.close()

"""Shared by the figure scripts: run the real ``aisec-train`` command line and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "cpu"


def own_stores(run_dir: Path, *, always: bool = False) -> dict[str, str]:
    """The environment for one figure run: its own ledger store and registry beside ``run_dir`` (unless the caller
    chose them), so a figure never spends the project's dataset budgets and no run is refused for an earlier one's.
    ``always``: even when the caller chose them, for runs that go concurrently (``--jobs``) and would otherwise
    wait on one dataset ledger's lock and compose their budgets."""
    stores = {
        "AISEC_TRAIN_LEDGER_STORE": str(run_dir.with_name(run_dir.name + "-ledgers")),
        "AISEC_TRAIN_REGISTRY": str(run_dir.with_name(run_dir.name + "-registry.json")),
    }
    return {**os.environ, **stores} if always else {**stores, **os.environ}


def run_cli(args: list[str], run_dir: Path) -> tuple[dict, float]:
    """Run ``aisec-train ARGS hydra.run.dir=RUN_DIR``; return its report.json and the wall-clock seconds."""
    cmd = [sys.executable, "-m", "aisec_train", *args, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=own_stores(run_dir))
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"aisec-train {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "report.json").read_text()), seconds


def write(name: str, result: dict, out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


class Progress:
    """The finished pieces of a long figure, one JSON line each in ``OUT.progress.jsonl`` beside its output. A
    re-run with the same ``context`` (seeds aside: quick or not, sample counts) keeps them instead of measuring them
    again, so a figure that takes hours on 2 cores can be measured across several sittings."""

    def __init__(self, out: Path, **context: Any):
        self.path, self.context = out.with_suffix(".progress.jsonl"), context
        self.done: dict[str, Any] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                entry = json.loads(line)
                if entry["context"] == context:
                    self.done[entry["key"]] = entry["value"]

    def get(self, key: str) -> Any:
        if key in self.done:
            print(f"{key}: kept from {self.path.name}", file=sys.stderr)
        return self.done.get(key)

    def add(self, key: str, value: Any) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as stream:
            stream.write(json.dumps({"key": key, "context": self.context, "value": value}) + "\n")
        self.done[key] = value
        return value

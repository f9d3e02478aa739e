"""Shared by the issue-14 federated figures: the typeset-digit data set, a job's peak memory, result rows.

``glyph_digits(n)`` writes (once) ``outputs/figure_data/glyph_digits_<n>.npz`` with scripts/figures/glyphs.py;
``run_measured`` runs the real ``aisec-train`` command line like ``common.run_cli`` and samples the resident
memory (PSS: shared pages counted once) of the job and every process it started (Ray's GCS, raylet and client
actors) from /proc every 0.5 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import REPO, own_stores

DATA = REPO / "outputs" / "figure_data"
PAGE = os.sysconf("SC_PAGE_SIZE")


def glyph_digits(n: int, seed: int = 0) -> Path:
    path = DATA / f"glyph_digits_{n}_{seed}.npz"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        script = REPO / "scripts" / "figures" / "glyphs.py"
        cmd = [sys.executable, str(script), "--out", str(path), "--n", str(n), "--alphabet", "digits"]
        subprocess.run([*cmd, "--seed", str(seed)], check=True, cwd=REPO)
    return path


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (libraries, Ray's object store) split among the processes mapping
    them, so a sum over processes counts each page once; resident size when smaps_rollup is unavailable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _tree_memory(root: int) -> int:
    """Memory of ``root`` and all its descendants (Linux /proc), PSS summed."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in tree}
        tree |= frontier
    return sum(_pss(p) for p in tree)


def run_measured(args: list[str], run_dir: Path) -> tuple[dict, float, int]:
    """Run ``aisec-train ARGS hydra.run.dir=RUN_DIR``; return its report, wall seconds and peak tree PSS (bytes)."""
    cmd = [sys.executable, "-m", "aisec_train", *args, f"hydra.run.dir={run_dir}"]
    env = {**own_stores(run_dir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_memory(proc.pid))
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"aisec-train {' '.join(args)} failed:\n{err[-2000:]}")
    return json.loads((run_dir / "report.json").read_text()), seconds, peak[0]


def markdown(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)

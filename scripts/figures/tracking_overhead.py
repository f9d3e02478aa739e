"""Issue 22 figure: the wall-time overhead of each experiment tracker on the default job (goal: under 3%).

    python scripts/figures/tracking_overhead.py                # the default job, 3 repeats per logger
    python scripts/figures/tracking_overhead.py --quick        # experiment=smoke, audits off: minutes

Each repeat runs the job once per logger (none, csv, tensorboard, mlflow, wandb offline), back to back in an
order rotated every repeat, each in a fresh process (imports and start-up count, as for a user). Two measures:

- ``blocked``: the seconds the job's own process spent inside tracking (opening the trackers, every record, the
  final headline, and waiting at close for the tracking child to finish writing), timed in that process around
  the tracker's entry points, divided by the same run's wall time. This is the overhead tracking adds to the
  training process itself, and it is barely affected by other load on the machine.
- ``wall``: per repeat, (job wall time with the logger) / (the same repeat's job with logger=none) - 1; the figure
  is the median over repeats. End to end, so it also includes the CPU the tracking child takes from the machine;
  on a shared 2-core machine two identical jobs differ by several percent, so csv's own ratio (its tracker costs
  microseconds) shows the noise floor of this number.

The MLflow store template (tracking/mlflow_logger.py) is built once before measuring, as after a first run; its
one-time build is timed and reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, own_stores, write

LOGGERS = ["none", "csv", "tensorboard", "mlflow", "wandb"]
GOAL = 0.03


def child(out: Path, args: list[str]) -> None:
    """One job in this process, with a timer around each of the tracker's entry points the pipeline calls."""
    import aisec_train.tracking as tracking
    from aisec_train.cli import main
    from aisec_train.tracking.base import Tracker

    blocked = {"open": 0.0, "log": 0.0, "finish": 0.0, "close": 0.0}

    def timed(part, fn):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                blocked[part] += time.perf_counter() - started

        return wrapper

    tracking.open_tracker = timed("open", tracking.open_tracker)  # tracking() looks it up in its module
    Tracker.log_metrics = timed("log", Tracker.log_metrics)  # per step, per epoch, and log_history's replay
    Tracker.finish = timed("finish", Tracker.finish)
    Tracker.close = timed("close", Tracker.close)
    sys.argv = ["aisec-train", *args]
    try:
        main()
    finally:
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tracking child(ren), waited for at close
        out.write_text(json.dumps({"blocked": blocked, "child_cpu_s": cpu.ru_utime + cpu.ru_stime}))


def run_job(args: list[str], run_dir: Path) -> dict:
    timing = run_dir.with_name(run_dir.name + "-timing.json")
    cmd = [sys.executable, __file__, "--child", str(timing), "--", *args, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=own_stores(run_dir))
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    measured = json.loads(timing.read_text())
    report = json.loads((run_dir / "report.json").read_text())
    timings = report.get("run", {}).get("timings") or report.get("run", {}).get("stage_seconds") or {}
    return {"wall_s": wall, "train_stage_s": timings.get("train"), **measured,
            "blocked_s": sum(measured["blocked"].values())}  # fmt: skip


def build_template() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from aisec_train.tracking.mlflow_logger import empty_store; empty_store()"],
                   cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - started


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name in LOGGERS[1:]:
        blocked = [r["blocked_s"] / r["wall_s"] for r in runs[name]]
        wall = [r["wall_s"] / base["wall_s"] - 1 for r, base in zip(runs[name], runs["none"], strict=True)]
        out[name] = {
            "blocked_fraction_median": round(statistics.median(blocked), 5),
            "blocked_fraction_max": round(max(blocked), 5),
            "blocked_s_median": round(statistics.median(r["blocked_s"] for r in runs[name]), 3),
            "wall_overhead_median": round(statistics.median(wall), 4),
            "wall_overhead_per_repeat": [round(w, 4) for w in wall],
            "child_cpu_s_median": round(statistics.median(r["child_cpu_s"] for r in runs[name]), 2),
            "blocked_under_goal": max(blocked) < GOAL,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the job's own)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(args.child, [a for a in rest if a != "--"])
    base = ["experiment=smoke", "audit=off", "robustness.evaluate=false"] if args.quick else []
    base += ["privacy.budget_scope=run"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    template_s = build_template()
    runs: dict[str, list[dict]] = {name: [] for name in LOGGERS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = LOGGERS[repeat % len(LOGGERS) :] + LOGGERS[: repeat % len(LOGGERS)]
            for name in order:
                run = run_job([*base, f"logger={name}"], Path(tmp) / f"{name}-{repeat}")
                runs[name].append(run)
                print(f"repeat {repeat} logger={name}: {run['wall_s']:.1f} s, blocked {run['blocked_s']:.3f} s, "
                      f"child CPU {run['child_cpu_s']:.1f} s", flush=True)  # fmt: skip
            result = {  # written after every repeat: a long figure on a loaded machine keeps what it measured
                "job": "quick (experiment=smoke, audits off)" if args.quick else "default job",
                "overrides": base,
                "repeats": repeat + 1,
                "goal": f"tracking overhead < {GOAL:.0%} of the job's wall time, per logger",
                "loggers": summarise(runs),
                "mlflow_template_build_s": round(template_s, 2),
                "runs": runs,
                "load_average_at_end": os.getloadavg(),
                "cpus": os.cpu_count(),
                "note": "blocked_fraction: time the job's process spent inside tracking / its wall time (the "
                "overhead the trackers add to training; barely load-sensitive). wall_overhead: end to end against "
                "logger=none in the same repeat, including the tracking child's CPU; on a shared machine csv's own "
                "wall_overhead is the noise floor of that number.",
            }
            path = write("tracking_overhead", result, args.out)
    print(path)
    for name, row in result["loggers"].items():
        print(f"{name}: blocked {row['blocked_fraction_median']:.2%} (max {row['blocked_fraction_max']:.2%}), "
              f"wall {row['wall_overhead_median']:+.1%} {row['wall_overhead_per_repeat']}")  # fmt: skip


if __name__ == "__main__":
    main()

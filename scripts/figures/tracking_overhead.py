"""Issue 22 figure: the overhead of each experiment tracker on the default job (goal: under 3% per logger).

    python scripts/figures/tracking_overhead.py                # the default job, 5 pairs per logger
    python scripts/figures/tracking_overhead.py --quick        # experiment=smoke, audits off: minutes

Every job runs in a fresh process (imports and start-up count, as for a user). The runs are interleaved in pairs,
``logger=none`` beside ``logger=X`` (A B A B ...; which of the two goes first alternates, and the loggers' order
rotates every repeat), so slow drift in the machine's load falls on both halves of a pair alike. Three measures,
each per pair, then the median over pairs with a 95% bootstrap interval (scipy.stats.bootstrap, percentile):

- ``wall``: (the job's wall time with X) / (the paired logger=none job's) - 1. End to end, so it includes the CPU
  the tracking child takes from the machine; on a machine loaded by other work this ratio is noisy (csv's own,
  whose tracker costs microseconds, shows the noise floor).
- ``cpu``: (CPU seconds of the whole process tree with X - those of the paired none job) / the none job's wall time.
  The tree is the job, its tracking child and whatever that child starts (wandb's service): this driver makes
  itself their child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), reaps the orphans and reads its
  ``RUSAGE_CHILDREN``. CPU seconds hardly change with other load, so this is the steadier figure of what tracking
  costs, and an upper bound on its wall overhead (it equals it only if the machine has no idle core).
- ``blocked``: the seconds the job's own process spent inside tracking (opening the trackers, every record, the
  final headline, and waiting at close for the tracking child to finish writing), timed in that process around
  the tracker's entry points, over the same run's wall time: what tracking holds training up by.
- ``tracking_cpu_s``: the CPU seconds of the processes the job started (the tree's minus the job process's own),
  minus the paired none job's: the tracking child and its children alone, without the job's own CPU noise.
- ``cpu_share``: ``tracking_cpu_s`` over the paired none job's own CPU seconds. Neither depends on the load: with
  one training thread (OMP_NUM_THREADS=1) a quiet job's wall time is about its CPU time, so this is the wall
  overhead tracking would have if its child shared the training's one core (none idle).

The MLflow store template (tracking/mlflow_logger.py) is built once before measuring, as after a first run; its
one-time build is timed and reported apart.
"""

from __future__ import annotations

import argparse
import ctypes
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

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

LOGGERS = ["csv", "tensorboard", "mlflow", "wandb"]
GOAL = 0.03
PR_SET_CHILD_SUBREAPER = 36
REAP_WAIT_S = 60.0  # wandb's service notices its parent is gone within seconds


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
        own = resource.getrusage(resource.RUSAGE_SELF)  # the job's own process: training and the rest
        out.write_text(json.dumps({"blocked": blocked, "child_cpu_s": cpu.ru_utime + cpu.ru_stime,
                                   "self_cpu_s": own.ru_utime + own.ru_stime}))  # fmt: skip


def become_subreaper() -> bool:
    """Orphans of the job's tree (wandb's service outlives the tracking child) are re-parented to this process, so
    their CPU reaches our RUSAGE_CHILDREN once reaped."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans() -> int:
    """Wait for every re-parented descendant; returns how many were still running after REAP_WAIT_S (their CPU
    is then missing from the tree's total, and the figure says so)."""
    deadline = time.monotonic() + REAP_WAIT_S
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:
            if time.monotonic() > deadline:
                return _children()
            time.sleep(0.05)


def _children() -> int:
    me = str(os.getpid())
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            count += fields[1] == me
    return count


def tree_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_job(args: list[str], run_dir: Path) -> dict:
    timing = run_dir.with_name(run_dir.name + "-timing.json")
    cmd = [sys.executable, __file__, "--child", str(timing), "--", *args, f"hydra.run.dir={run_dir}"]
    cpu_before = tree_cpu()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=own_stores(run_dir))
    wall = time.perf_counter() - started
    unreaped = reap_orphans()
    cpu = tree_cpu() - cpu_before
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    measured = json.loads(timing.read_text())
    measured["descendants_cpu_s"] = round(cpu - measured["self_cpu_s"], 3)  # every process the job started
    return {"wall_s": round(wall, 3), "tree_cpu_s": round(cpu, 3), "unreaped": unreaped,
            "load_1min": os.getloadavg()[0], **measured,
            "blocked_s": sum(measured["blocked"].values())}  # fmt: skip


def build_template() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from aisec_train.tracking.mlflow_logger import empty_store; empty_store()"],
                   cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - started


def median_ci(values: list[float]) -> dict:
    """The median and its 95% bootstrap interval (percentile method; too few values: no interval)."""
    import numpy as np
    from scipy.stats import bootstrap

    out = {"median": round(statistics.median(values), 5), "per_pair": [round(v, 5) for v in values]}
    if len(values) >= 3 and len(set(values)) > 1:
        ci = bootstrap((np.asarray(values),), np.median, confidence_level=0.95, n_resamples=9999,
                       method="percentile", rng=np.random.default_rng(0)).confidence_interval  # fmt: skip
        out["ci95"] = [round(float(ci.low), 5), round(float(ci.high), 5)]
    return out


def summarise(pairs: list[dict]) -> dict:
    out = {}
    for name in LOGGERS:
        mine = [p for p in pairs if p["logger"] == name]
        if not mine:
            continue
        wall = median_ci([p["x"]["wall_s"] / p["none"]["wall_s"] - 1 for p in mine])
        cpu = median_ci([(p["x"]["tree_cpu_s"] - p["none"]["tree_cpu_s"]) / p["none"]["wall_s"] for p in mine])
        added = [p["x"]["descendants_cpu_s"] - p["none"]["descendants_cpu_s"] for p in mine]
        share = median_ci([a / p["none"]["self_cpu_s"] for a, p in zip(added, mine, strict=True)])
        blocked = [p["x"]["blocked_s"] / p["x"]["wall_s"] for p in mine]
        out[name] = {
            "pairs": len(mine),
            "wall_overhead": wall,
            "cpu_overhead": cpu,
            "tracking_cpu_s": median_ci(added),  # the tracking processes' CPU seconds (job's descendants)
            "cpu_share": share,  # tracking CPU over the none job's own CPU: the load-free, one-core bound
            "blocked_fraction_median": round(statistics.median(blocked), 5),
            "blocked_fraction_max": round(max(blocked), 5),
            "tracking_child_cpu_s_median": round(statistics.median(p["x"]["child_cpu_s"] for p in mine), 2),
            "added_tree_cpu_s_median": round(
                statistics.median(p["x"]["tree_cpu_s"] - p["none"]["tree_cpu_s"] for p in mine), 2
            ),
            "under_goal": {
                "blocked": max(blocked) < GOAL,
                "cpu_median": cpu["median"] < GOAL,
                "cpu_share_median": share["median"] < GOAL,
                "wall_median": wall["median"] < GOAL,
                "wall_ci_upper": "ci95" in wall and wall["ci95"][1] < GOAL,
            },
        }
    return out


def measure(design: str, loggers: list[str], repeat: int, base: list[str], tmp: Path):
    """One repeat's pairs, yielded as each completes."""
    if design == "pairs":
        shift = repeat % len(loggers)
        for i, name in enumerate(loggers[shift:] + loggers[:shift]):
            first = ("none", name) if (repeat + i) % 2 == 0 else (name, "none")  # who goes first alternates
            pair: dict = {"logger": name, "repeat": repeat, "first": first[0]}
            for which in first:
                pair["none" if which == "none" else "x"] = run_job([*base, f"logger={which}"],
                                                                   tmp / f"{which}-{name}-{repeat}")  # fmt: skip
            yield pair
        return
    names = ["none", *loggers]
    shift = repeat % len(names)
    runs = {name: run_job([*base, f"logger={name}"], tmp / f"{name}-{repeat}")
            for name in names[shift:] + names[:shift]}  # fmt: skip
    for name in loggers:
        yield {"logger": name, "repeat": repeat, "order": names[shift:] + names[:shift], "x": runs[name],
               "none": runs["none"]}  # fmt: skip


def main() -> None:
    parser = RefusingParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="pairs per logger")
    parser.add_argument("--loggers", nargs="+", default=LOGGERS, choices=LOGGERS)
    parser.add_argument(
        "--design",
        choices=["pairs", "blocks"],
        default="pairs",
        help="pairs: none beside X for every X (2 runs a pair); blocks: one none per repeat shared "
        "by every X of that repeat, in a rotated order (fewer runs when the machine is slow)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the job's own)")
    parser.add_argument("--out", type=output_file, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(args.child, [a for a in rest if a != "--"])
    if rest:  # only the child takes arguments of its own: a typo here ran the whole figure without it
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    base = ["experiment=smoke", "audit=off", "robustness.evaluate=false"] if args.quick else []
    base += ["privacy.budget_scope=run"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    reaper = become_subreaper()
    template_s = build_template()
    pairs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for pair in measure(args.design, args.loggers, repeat, base, Path(tmp)):
                pairs.append(pair)
                x, none = pair["x"], pair["none"]
                print(f"repeat {repeat} {pair['logger']}: wall {x['wall_s']:.1f} s vs none {none['wall_s']:.1f} s, "
                      f"tree CPU {x['tree_cpu_s']:.1f} vs {none['tree_cpu_s']:.1f} s, blocked {x['blocked_s']:.3f} s, "
                      f"load {x['load_1min']:.1f}", flush=True)  # fmt: skip
                result = {  # written after every pair: a long figure on a loaded machine keeps what it measured
                    "design": args.design,
                    "job": "quick (experiment=smoke, audits off)" if args.quick else "default job",
                    "overrides": base,
                    "goal": f"tracking overhead < {GOAL:.0%} of the job's wall time, per logger",
                    "loggers": summarise(pairs),
                    "subreaper": reaper,
                    "mlflow_template_build_s": round(template_s, 2),
                    "pairs": pairs,
                    "load_average_at_end": os.getloadavg(),
                    "cpus": os.cpu_count(),
                    "note": "wall_overhead: X's wall over the paired logger=none job's, minus 1 (load-sensitive). "
                    "cpu_overhead: the CPU seconds the whole process tree (job + tracking child + its children) "
                    "added over the paired none job, per second of the none job's wall time. tracking_cpu_s: the "
                    "CPU of the processes the job started, minus the none job's. cpu_share: tracking_cpu_s over "
                    "the none job's own CPU (the one-core, no-idle-core bound, load-free). blocked: time the job's "
                    "process spent inside tracking / its wall time. Medians over pairs, 95% bootstrap intervals "
                    "(percentile).",
                }
                path = write("tracking_overhead", result, args.out)
    print(path)
    for name, row in result["loggers"].items():
        w, c, t = row["wall_overhead"], row["cpu_overhead"], row["cpu_share"]
        print(f"{name}: wall {w['median']:+.2%} {w.get('ci95')}, cpu {c['median']:+.2%} {c.get('ci95')}, "
              f"tracking CPU {row['tracking_cpu_s']['median']:.2f} s = {t['median']:.2%} of the job's CPU, "
              f"blocked {row['blocked_fraction_median']:.3%} (max {row['blocked_fraction_max']:.3%})")  # fmt: skip


if __name__ == "__main__":
    main()

"""Issue 22 figures: torchrun against one process, 1 vs 2 processes, and the elastic drill.

    python scripts/figures/torchrun.py --quick                  # experiment=smoke, 2 epochs
    python scripts/figures/torchrun.py --seeds 0 1 2 3 4 --skip drill   # the default job (40 epochs), 5 paired seeds
    python scripts/figures/torchrun.py --skip compare --drill-epochs 4 --kills 5 --name torchrun_drill

1. The same DP job as one process, as ``train.distributed.nproc=2``, as two torchrun "nodes" of one process and
   as two nodes of two (gloo over loopback, c10d rendezvous): epsilon, sample rate, steps, every replica's digest,
   clean accuracy and wall time; each arm once per seed (the same seeds in every arm), the paired accuracy
   differences against one process with a bootstrap interval.
2. Elastic drill: ``nproc=2 max_restarts=K``; one worker is SIGKILLed at a random instant of each job; each job
   must finish with the dataset ledger's steps equal to the report's and epsilon within the target.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, own_stores, run_cli, write

from aisec_train.errors import RefusingParser

# The ledger's command line (aisec-train-ledger), wherever the privacy package keeps it.
LEDGER_CLI = next(
    m for m in ("aisec_train.privacy.ledger_cli", "aisec_train.ledger_cli")
    if (REPO / (m.replace(".", "/") + ".py")).exists()
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], run_dir: Path, nodes: int, per_node: int) -> tuple[dict, float]:
    port, env = free_port(), {**own_stores(run_dir), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={nodes}",
                f"--nproc-per-node={per_node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id=fig{port}",
                "-m",
                "aisec_train",
                *args,
                f"hydra.run.dir={run_dir}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(nodes)
    ]
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"torchrun failed:\n{errors[0][-2000:]}")
    return json.loads((run_dir / "report.json").read_text()), time.perf_counter() - started


def summary(report: dict, seconds: float, run_dir: Path) -> dict:
    """One run's figures. ``epoch_seconds``: the training epochs alone (metrics.csv), without process start-up,
    data loading or evaluation, which differ between launchers."""
    p, t = report["privacy"], report["train"]
    with (run_dir / "metrics.csv").open() as stream:
        epoch_seconds = sum(float(row["seconds"]) for row in csv.DictReader(stream))
    return {
        "epoch_seconds": round(epoch_seconds, 3),
        "epsilon": p["epsilon"], "sample_rate": p["sample_rate"], "steps": p["steps"],
        "clean_accuracy": report["metrics"]["clean_accuracy"], "world_size": t["world_size"],
        "digests_equal": len(set((t.get("distributed") or {}).get("rank_weights_sha256", ["-"]))) == 1,
        "wall_seconds": round(seconds, 2), "train_seconds": report["run"]["timings"]["train"],
    }  # fmt: skip


def drill(base: list[str], tmp: Path, kills: int, seed: int, window_s: float, progress=None) -> list[dict]:
    """Jobs until ``kills`` kills forced a restart: each job SIGKILLs one of its two ranks at a uniformly random
    instant of ``window_s`` after its first rank appeared (start-up, training or after). A kill after the
    job's training ended (or none, the job having finished) forces no restart and is recorded as such; at most
    ``2 * kills`` jobs in all."""
    rng, rows = random.Random(seed), []
    for i in range(2 * kills):
        if sum(r["restarts"] > 0 for r in rows) >= kills:  # kills that cost the job a restart
            break
        run_dir = tmp / f"drill{i}"
        env = {**own_stores(run_dir), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "aisec_train", *base, "train.distributed.nproc=2",
               "train.distributed.max_restarts=3", f"hydra.run.dir={run_dir}"]  # fmt: skip
        # stderr to a file: a pipe nobody reads until the end fills up and stalls the job before its ranks start
        stderr = (tmp / f"drill{i}.stderr").open("w+")
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        # The window opens when the first rank exists: a kill may land while a rank still starts up (imports, reads
        # its job), during training, or after it (no restart needed). Start-up kills used to hang the launcher
        # (spawn's pipe; distributed.JobPayload) and were left out; they are in now.
        while not (mine := _ranks(job.pid)) and job.poll() is None:
            time.sleep(0.05)
        delay = rng.uniform(0.0, window_s)
        time.sleep(delay)
        mine = _ranks(job.pid)
        victim = rng.choice(mine) if mine else None
        phase = "training" if (run_dir / "checkpoints" / "last.pt").exists() else "start-up or first epoch"
        killed = victim is not None and job.poll() is None and _kill(victim)
        try:
            job.wait(timeout=1200)
            hung = False
        except subprocess.TimeoutExpired:  # a launcher that hangs is a failed job, recorded, not a stuck figure
            hung = True
            for pid in [*_children(job.pid), job.pid]:
                _kill(pid)
            job.wait()
        stderr.seek(0)
        err = stderr.read()
        stderr.close()
        report = json.loads((run_dir / "report.json").read_text()) if job.returncode == 0 else {}
        show = subprocess.run([sys.executable, "-m", LEDGER_CLI, "show",
                               report.get("data", {}).get("manifest_sha256", "-")], cwd=REPO, env=env,
                              capture_output=True, text=True).stdout  # fmt: skip
        charged = re.search(r"over (\d+) step", show)
        log = (run_dir / "cli.log").read_text() if (run_dir / "cli.log").exists() else ""
        privacy = report.get("privacy", {})
        rows.append({
            "kill_after_first_rank_s": round(delay, 2), "killed": killed, "phase": phase, "hung": hung,
            "returncode": job.returncode,
            "restarts": log.count("from the last checkpoint"),
            "report_steps": privacy.get("steps"), "ledger_steps": int(charged.group(1)) if charged else None,
            "epsilon": privacy.get("epsilon"), "target_epsilon": privacy.get("target_epsilon"),
            "epochs_completed": report.get("train", {}).get("epochs_completed"),
            "error": err[-3000:] if job.returncode else "",  # enough to see why a job failed
            "cli_log_tail": log[-3000:] if job.returncode else "",
        })  # fmt: skip
        rows[-1]["ok"] = bool(
            job.returncode == 0 and rows[-1]["ledger_steps"] == rows[-1]["report_steps"]
            and rows[-1]["epsilon"] is not None and rows[-1]["epsilon"] <= (rows[-1]["target_epsilon"] or 1e9)
        )  # fmt: skip
        print(rows[-1], flush=True)
        if progress is not None:
            progress(rows)
    return rows


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, 9)
        return True
    except ProcessLookupError:  # the worker ended on its own between the check and the kill
        return False


def _ranks(pid: int) -> list[int]:
    return [p for p in _children(pid) if "multiprocessing.spawn" in _cmdline(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out] + [c for p in out for c in _children(int(p))]


def compare(base: list[str], tmp: Path, seeds: list[int]) -> dict:
    """Every arm once per seed (``train.seed``: the initial weights), interleaved seed by seed so the machine's load
    hits all arms alike: a paired design. The DP noise and Poisson batches stay secret (OS entropy) in every arm,
    so each pair still differs by its own draws; the paired differences against one process get a bootstrap
    interval, and the arm's mean is within one point when the mean difference is."""
    launches = {
        "one_process": lambda a, d: run_cli(a, d),
        "nproc2": lambda a, d: run_cli([*a, "train.distributed.nproc=2"], d),
        "torchrun_2x1": lambda a, d: torchrun(a, d, 2, 1),
        "torchrun_2x2": lambda a, d: torchrun(a, d, 2, 2),
    }
    runs: dict[str, list[dict]] = {k: [] for k in launches}
    for seed in seeds:
        for name, launch in launches.items():
            run_dir = tmp / f"{name}-seed{seed}"
            runs[name].append({"seed": seed, **summary(*launch([*base, f"train.seed={seed}"], run_dir), run_dir)})
            print(name, runs[name][-1], flush=True)
    one = runs["one_process"]
    checks = {}
    for name, rows in runs.items():
        accuracy = [r["clean_accuracy"] for r in rows]
        diffs = [r["clean_accuracy"] - o["clean_accuracy"] for r, o in zip(rows, one, strict=True)]
        mean_diff = sum(diffs) / len(diffs)
        checks[name] = {
            "epsilon_equal": all(r["epsilon"] == one[0]["epsilon"] for r in rows),
            "sample_rate_equal": all(r["sample_rate"] == one[0]["sample_rate"] for r in rows),
            "steps_equal": all(r["steps"] == one[0]["steps"] for r in rows),
            "digests_equal": all(r["digests_equal"] for r in rows),
            "mean_accuracy": round(sum(accuracy) / len(accuracy), 4),
            "accuracy_range": round(max(accuracy) - min(accuracy), 4),
            "paired_difference_vs_one_process": [round(d, 4) for d in diffs],
            "mean_paired_difference": round(mean_diff, 4),
            "mean_paired_difference_95ci": bootstrap_ci(diffs) if name != "one_process" else [0.0, 0.0],
            "within_one_point": abs(mean_diff) <= 0.01,
            "steps_per_epoch_second": round(sum(r["steps"] / r["epoch_seconds"] for r in rows) / len(rows), 3),
            "steps_per_train_second": round(sum(r["steps"] / r["train_seconds"] for r in rows) / len(rows), 3),
        }  # fmt: skip
    one_rate = checks["one_process"]
    throughput = {
        name: {
            "epochs_only": round(checks[name]["steps_per_epoch_second"] / one_rate["steps_per_epoch_second"], 3),
            "train_stage_with_start_up": round(
                checks[name]["steps_per_train_second"] / one_rate["steps_per_train_second"], 3
            ),
        }
        for name in ("nproc2", "torchrun_2x1")
    }  # fmt: skip
    return {
        "seeds": seeds, "runs": runs, "checks": checks, "throughput_2_vs_1_process": throughput,
        "nproc2_train_seconds": sum(r["train_seconds"] for r in runs["nproc2"]) / len(seeds),
    }  # fmt: skip


def bootstrap_ci(values: list[float]) -> list[float] | None:
    """95% BCa bootstrap interval of the mean (scipy); None with fewer than 3 values (no interval to speak of)."""
    if len(values) < 3:
        return None
    from scipy.stats import bootstrap

    if max(values) == min(values):
        return [round(values[0], 4)] * 2
    ci = bootstrap((values,), lambda v, axis: v.mean(axis=axis), n_resamples=9999, random_state=0).confidence_interval
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def main() -> None:
    parser = RefusingParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the job's own)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="train.seed, every arm")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--drill-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: compare, drill")
    parser.add_argument("--window", type=float, default=None, help="kill within this many seconds of the workers")
    parser.add_argument("--name", default="torchrun", help="benchmarks/results/cpu/NAME.json")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # every arm's every process one thread (torchrun's agents already were)
    base = ["audit=off", "robustness.evaluate=false", "privacy.budget_scope=run"]
    base += ["experiment=smoke", "train.epochs=2"] if args.quick else []
    base += [f"train.epochs={args.epochs}"] if args.epochs else []
    result: dict = {
        "job": ("experiment=smoke" if args.quick else "default job") + " with audits and robustness evaluation off"
        + (f", train.epochs={args.epochs}" if args.epochs else ""),
        "threads_per_process": 1,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        window = args.window or 20.0
        if "compare" not in args.skip:
            result.update(compare(base, tmp, args.seeds))
            print(json.dumps(result["checks"], indent=1), flush=True)
            per_epoch = result["nproc2_train_seconds"] / (args.epochs or (2 if args.quick else 40))
            window = args.window or per_epoch * args.drill_epochs
        if "drill" not in args.skip:
            drill_job = [*base, f"train.epochs={args.drill_epochs}"]
            result["drill_job"] = " ".join(drill_job)
            result["drill_window_s"] = window

            def progress(rows: list[dict]) -> None:  # what is done survives a stopped figure
                write(args.name, {**result, "drill": rows, "partial": True})

            result["drill"] = drill(drill_job, tmp, args.kills, args.seed, window, progress)
            rows = result["drill"]
            result["drill_summary"] = {
                "jobs": len(rows), "kills_delivered": sum(r["killed"] for r in rows),
                "kills_that_forced_a_restart": sum(r["restarts"] > 0 for r in rows),
                "all_jobs_ok": all(r["ok"] for r in rows),
            }  # fmt: skip
    result["note"] = (
        "2 shared cores, one thread per process, others loading the machine: times are noisy. Accuracies differ by "
        "the secret DP noise and Poisson batches of each run (OS entropy, so a seed pairs only the initial weights); "
        "checks[arm].accuracy_range shows that spread. throughput 'epochs_only' counts the training epochs "
        "(metrics.csv); 'train_stage_with_start_up' adds each launcher's start-up of its ranks"
    )
    print(write(args.name, result))


if __name__ == "__main__":
    main()

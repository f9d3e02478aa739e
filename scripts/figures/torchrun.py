"""Issue 22 figures: torchrun against one process, 1 vs 2 processes, and the elastic drill.

    python scripts/figures/torchrun.py --quick          # experiment=smoke, 2 epochs: ~10 min on 2 cores
    python scripts/figures/torchrun.py --kills 5        # the default job; the drill kills 5 workers

1. The same DP job as one process, as ``train.distributed.nproc=2``, as two torchrun "nodes" of one process and
   as two nodes of two (gloo over loopback, c10d rendezvous): epsilon, sample rate, steps, every replica's digest,
   clean accuracy and wall time.
2. Elastic drill: ``nproc=2 max_restarts=K``; one worker is SIGKILLed at a random instant of each job; each job
   must finish with the dataset ledger's steps equal to the report's and epsilon within the target.
"""

from __future__ import annotations

import argparse
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


def summary(report: dict, seconds: float) -> dict:
    p, t = report["privacy"], report["train"]
    return {
        "epsilon": p["epsilon"], "sample_rate": p["sample_rate"], "steps": p["steps"],
        "clean_accuracy": report["metrics"]["clean_accuracy"], "world_size": t["world_size"],
        "digests_equal": len(set((t.get("distributed") or {}).get("rank_weights_sha256", ["-"]))) == 1,
        "wall_seconds": round(seconds, 2), "train_seconds": report["run"]["timings"]["train"],
    }  # fmt: skip


def drill(base: list[str], tmp: Path, kills: int, seed: int) -> list[dict]:
    rng, rows = random.Random(seed), []
    for i in range(kills):
        run_dir = tmp / f"drill{i}"
        env = {**own_stores(run_dir), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "aisec_train", *base, "train.distributed.nproc=2",
               "train.distributed.max_restarts=3", f"hydra.run.dir={run_dir}"]  # fmt: skip
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(3.0, 20.0)
        time.sleep(delay)
        workers = [int(p) for p in subprocess.run(["pgrep", "-f", "multiprocessing.spawn"], capture_output=True,
                                                  text=True).stdout.split()]  # fmt: skip
        mine = [w for w in workers if _descends(w, job.pid)]
        killed = bool(mine) and job.poll() is None
        if killed:
            os.kill(rng.choice(mine), 9)
        err = job.communicate()[1]
        report = json.loads((run_dir / "report.json").read_text()) if job.returncode == 0 else {}
        show = subprocess.run([sys.executable, "-m", "aisec_train.privacy.ledger_cli", "show",
                               report.get("data", {}).get("manifest_sha256", "-")], cwd=REPO, env=env,
                              capture_output=True, text=True).stdout  # fmt: skip
        charged = re.search(r"over (\d+) step", show)
        rows.append({
            "kill_after_s": round(delay, 2), "killed": killed, "returncode": job.returncode,
            "report_steps": report.get("privacy", {}).get("steps"),
            "ledger_steps": int(charged.group(1)) if charged else None,
            "epsilon": report.get("privacy", {}).get("epsilon"), "error": err[-300:] if job.returncode else "",
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().split()[3])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: compare, drill")
    args = parser.parse_args()
    base = ["audit=off", "robustness.evaluate=false", "privacy.budget_scope=run"]
    base += ["experiment=smoke", "train.epochs=2"] if args.quick else []
    result: dict = {"job": "quick" if args.quick else "default job (audits and robustness off)"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "compare" not in args.skip:
            runs = {"one_process": summary(*run_cli(base, tmp / "one"))}
            runs["nproc2"] = summary(*run_cli([*base, "train.distributed.nproc=2"], tmp / "nproc2"))
            runs["torchrun_2x1"] = summary(*torchrun(base, tmp / "t21", 2, 1))
            runs["torchrun_2x2"] = summary(*torchrun(base, tmp / "t22", 2, 2))
            one = runs["one_process"]
            result["runs"] = runs
            ratios = {f"{k}_epsilon_equal": v["epsilon"] == one["epsilon"] for k, v in runs.items()}
            for k, v in runs.items():
                ratios[f"{k}_accuracy_minus_one"] = round(v["clean_accuracy"] - one["clean_accuracy"], 4)
            ratios["nproc2_vs_one_train_time"] = round(one["train_seconds"] / runs["nproc2"]["train_seconds"], 3)
            result["ratios"] = ratios
            print(json.dumps(result["ratios"], indent=1), flush=True)
        if "drill" not in args.skip:
            result["drill"] = drill([*base, "train.epochs=4"] if args.quick else base, tmp, args.kills, args.seed)
    result["note"] = "2 shared cores: times are noisy; accuracies differ by the secret DP noise of each run"
    print(write("torchrun", result))


if __name__ == "__main__":
    main()

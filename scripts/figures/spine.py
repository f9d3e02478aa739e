"""Issue 2's figures: the default job (digits, DP-SGD at epsilon 3) on this machine's CPU cores.

Per seed: ``aisec-train`` with no other arguments (the whole default pipeline, audits included, timed wall
clock) and ``aisec-train privacy=none``. Goals: epsilon <= 3 at delta 1e-5, clean accuracy >= 0.90 in under
3 minutes; the non-private run >= 0.96. Writes ``benchmarks/results/cpu/spine.json`` and a markdown table.

    .venv/bin/python scripts/figures/spine.py [--seeds 0 1 2]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common import run_cli, write

from aisec_train.errors import RefusingParser


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for case, extra in (("default", []), ("privacy=none", ["privacy=none"])):
                seed_arg = [f"train.seed={seed}"] if seed else []  # seed 0 is literally `aisec-train`
                report, seconds = run_cli(extra + seed_arg, Path(tmp) / f"{case.replace('=', '_')}-{seed}")
                rows.append(
                    {
                        "case": case,
                        "seed": seed,
                        "clean_accuracy": report["metrics"]["clean_accuracy"],
                        "epsilon": report["privacy"]["epsilon"],
                        "delta": report["privacy"]["delta"],
                        "wall_seconds": round(seconds, 1),
                        "train_seconds": report["run"]["timings"]["train"],
                    }
                )
    dp = [r for r in rows if r["case"] == "default"]
    plain = [r for r in rows if r["case"] == "privacy=none"]
    goals = {
        "dp_accuracy_min": min(r["clean_accuracy"] for r in dp),
        "dp_epsilon_max": max(r["epsilon"] for r in dp),
        "dp_wall_seconds_max": max(r["wall_seconds"] for r in dp),
        "nonprivate_accuracy_min": min(r["clean_accuracy"] for r in plain),
    }
    goals["met"] = (
        goals["dp_accuracy_min"] >= 0.90
        and goals["dp_epsilon_max"] <= 3.0
        and goals["dp_wall_seconds_max"] < 180
        and goals["nonprivate_accuracy_min"] >= 0.96
    )
    path = write("spine", {"figure": "default job", "cpus": os.cpu_count(), "rows": rows, "goals": goals})
    print("| case | seed | clean accuracy | epsilon | wall s | train s |\n|---|---|---|---|---|---|")
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        print(
            f"| {r['case']} | {r['seed']} | {r['clean_accuracy']:.4f} | {eps} | {r['wall_seconds']} | "
            f"{r['train_seconds']} |"
        )
    print(f"\n{goals}\n-> {path}")


if __name__ == "__main__":
    main()

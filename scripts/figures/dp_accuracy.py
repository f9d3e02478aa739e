"""Issue 13's accuracy figure: does the one-backward private step (``privacy.grad_sample_mode=bk``, the default)
train the default job as well as the step it replaced (Opacus ``ghost``, the default when the issue was filed)?

Per seed, the real ``aisec-train`` default job twice, differing only in ``privacy.grad_sample_mode`` (same data,
split, model init, epsilon 3 at delta 1e-5, Poisson sampling); the stages after training that do not change the
model are off (``audit=off robustness.evaluate=false``). The two modes compute the same clipped gradient sum
(``tests/test_bk.py`` holds them to 1e-5) but draw their noise and batches in a different order, so
per seed the accuracies differ by the run-to-run noise; the figure is the mean over seeds. Goal: |bk - ghost| <=
0.5 points. Each run spends on its own ledger store.

    .venv/bin/python scripts/figures/dp_accuracy.py [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from common import run_cli, write

from aisec_train.errors import RefusingParser

MODES = ("ghost", "bk")


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in MODES:  # interleaved, so a load spike falls on both
                overrides = [f"train.seed={seed}", f"privacy.grad_sample_mode={mode}", "audit=off",
                             "robustness.evaluate=false"]  # fmt: skip
                report, seconds = run_cli(overrides, Path(tmp) / f"{mode}-{seed}")
                metrics, timings = report["metrics"], report["run"]["timings"]
                rows.append({"mode": mode, "seed": seed, "clean_accuracy": metrics["clean_accuracy"],
                             "epsilon": report["privacy"]["epsilon"], "train_seconds": timings["train"],
                             "wall_seconds": round(seconds, 1)})  # fmt: skip

    def mean(mode: str, key: str, seeds: list[int]) -> float:
        return statistics.mean(r[key] for r in rows if r["mode"] == mode and r["seed"] in seeds)

    def gap(seeds: list[int]) -> float:
        return round(mean("bk", "clean_accuracy", seeds) - mean("ghost", "clean_accuracy", seeds), 4)

    seconds = {mode: mean(mode, "train_seconds", args.seeds) for mode in MODES}
    ratios = {
        "bk_minus_ghost_accuracy": gap(args.seeds),
        "bk_minus_ghost_accuracy_first3": gap(args.seeds[:3]),
        "ghost_over_bk_train_seconds": round(seconds["ghost"] / seconds["bk"], 3),
    }
    result = {"figure": "dp_accuracy", "cpus": os.cpu_count(), "seeds": args.seeds, "rows": rows, "ratios": ratios,
              "goal": "|bk - ghost| <= 0.005", "met": abs(ratios["bk_minus_ghost_accuracy"]) <= 0.005}  # fmt: skip
    path = write("dp_accuracy", result)
    print("| mode | seed | clean accuracy | epsilon | train s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['seed']} | {r['clean_accuracy']:.4f} | {r['epsilon']:.3f} | {r['train_seconds']} |")
    print(f"\n{ratios}\n-> {path}")


if __name__ == "__main__":
    main()

"""Issue 24's DP-recipe figure: test accuracy at epsilon 8 of ``experiment=dp_recipe`` (wide ResNet with GroupNorm
and weight standardisation, augmentation multiplicity, large batch, EMA) against the default model on the same data
and epsilon, and the wall time of an epoch as the augmentation multiplicity K grows.

Runs the real command line (audit and robust evaluation off: they measure other things), each run with its own
ledger store, and writes ``benchmarks/results/cpu/dp_recipe.json``.

    .venv/bin/python scripts/figures/dp_recipe.py                                   # digits, 40 epochs, K 1 2 4 8
    .venv/bin/python scripts/figures/dp_recipe.py --set dataset=npz dataset.path=cifar5k.npz train.augmult_flip=true
    .venv/bin/python scripts/figures/dp_recipe.py --quick                           # a smoke check: 1 epoch each

Timings on the shared 2-core CPU are noisy (other jobs): compare the K rows with each other, measured back to back.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import RESULTS, run_cli, write

OFF = ["audit=off", "robustness.evaluate=false", "privacy.target_epsilon=8"]


def _row(name: str, report: dict, wall: float) -> dict:
    epochs = report["train"]["epochs_completed"] or 1
    return {
        "case": name,
        "clean_accuracy": report["metrics"]["clean_accuracy"],
        "epsilon": report["privacy"]["epsilon"],
        "noise_multiplier": report["privacy"]["noise_multiplier"],
        "steps": report["privacy"]["steps"],
        "epochs": epochs,
        "train_seconds": report["run"]["stage_seconds"]["train"],
        "seconds_per_epoch": report["run"]["stage_seconds"]["train"] / epochs,
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run (the data, say)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--k-epochs", type=int, default=2, help="epochs of each K-timing run")
    parser.add_argument("--quick", action="store_true", help="1 epoch everywhere, WRN-10-1: checks the script")
    parser.add_argument("--out", type=Path, default=RESULTS / "dp_recipe.json")
    args = parser.parse_args()
    common = [*OFF, *args.set]
    small = ["train.epochs=1", "model.depth=10", "model.width=1"] if args.quick else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for name, case in {"default_model": [], "dp_recipe": ["experiment=dp_recipe"]}.items():
            extra = ["train.epochs=1"] if args.quick else []
            report, wall = run_cli([*case, *common, *(small if case else extra)], tmp / name)
            rows.append(_row(name, report, wall))
            print(rows[-1], file=sys.stderr)
        timing = []
        for k in args.ks:
            epochs = 1 if args.quick else args.k_epochs
            case = ["experiment=dp_recipe", *common, *small, f"train.augmult={k}", f"train.epochs={epochs}"]
            report, wall = run_cli(case, tmp / f"k{k}")
            timing.append({"augmult": k, **_row(f"k{k}", report, wall)})
            print(timing[-1], file=sys.stderr)
    base = timing[0]["seconds_per_epoch"] if timing else None
    for t in timing:
        t["epoch_time_over_k1"] = t["seconds_per_epoch"] / base if base else None
    result = {
        "figure": "DP accuracy at epsilon 8: dp_recipe vs the default model; seconds per epoch vs augmult K",
        "device": "cpu (2 cores, shared with other jobs: timings are noisy)",
        "overrides": common,
        "quick": args.quick,
        "goal": "dp_recipe >= default model + 10 points at the same epsilon on natural images (issue 24)",
        "rows": rows,
        "augmult_timing": timing,
    }
    write("dp_recipe", result, args.out)
    print("| case | accuracy | epsilon | epochs | s/epoch |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['clean_accuracy']:.3f} | {r['epsilon']:.2f} | {r['epochs']} | "
              f"{r['seconds_per_epoch']:.1f} |")  # fmt: skip
    print("\n| K | s/epoch | x K=1 |\n|---|---|---|")
    for t in timing:
        print(f"| {t['augmult']} | {t['seconds_per_epoch']:.1f} | {t['epoch_time_over_k1']:.2f} |")


if __name__ == "__main__":
    main()

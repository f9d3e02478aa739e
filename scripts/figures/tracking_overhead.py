"""Issue 22 figure: the wall-time overhead of each experiment tracker on the default job.

    python scripts/figures/tracking_overhead.py            # the default job, 3 repeats per logger
    python scripts/figures/tracking_overhead.py --quick    # experiment=smoke, audits off: minutes

Each repeat runs logger=none, csv, tensorboard, mlflow and wandb (offline) back to back, in a rotated order, and
the figure is the median over repeats of (job with the logger) / (job with none) - 1, for the whole job and for
the train stage alone (per-step logging). On a shared 2-core machine the noise between two identical jobs is
itself a few percent: read small overheads as "within noise".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import run_cli, write

LOGGERS = ["none", "csv", "tensorboard", "mlflow", "wandb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the job's own)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base = ["experiment=smoke", "audit=off", "robustness.evaluate=false"] if args.quick else []
    base += ["privacy.budget_scope=run", f"train.device={args.device}"]
    base += [f"train.epochs={args.epochs}"] if args.epochs else []  # each repeat: its own run's budget
    wall: dict[str, list[float]] = {name: [] for name in LOGGERS}
    train: dict[str, list[float]] = {name: [] for name in LOGGERS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = LOGGERS[repeat % len(LOGGERS) :] + LOGGERS[: repeat % len(LOGGERS)]
            for name in order:
                report, seconds = run_cli([*base, f"logger={name}"], Path(tmp) / f"{name}-{repeat}")
                wall[name].append(seconds)
                train[name].append(report["run"]["timings"]["train"])
                print(f"repeat {repeat} logger={name}: {seconds:.1f} s (train stage {train[name][-1]:.1f} s)")
    ratios = {}
    for name in LOGGERS[1:]:
        ratios[f"overhead_wall_{name}"] = round(statistics.median(wall[name]) / statistics.median(wall["none"]) - 1, 4)
        ratios[f"overhead_train_{name}"] = round(
            statistics.median(train[name]) / statistics.median(train["none"]) - 1, 4
        )
    result = {
        "job": ("quick (experiment=smoke, audits off)" if args.quick else "default job") + f", epochs {args.epochs}",
        "repeats": args.repeats,
        "device": args.device,
        "seconds": {"wall": wall, "train_stage": train},
        "ratios": ratios,
        "note": "2 shared cores: differences of a few percent are within run-to-run noise",
    }
    print(write("tracking_overhead" if args.device == "cpu" else f"tracking_overhead_{args.device}", result, args.out))
    for key, value in ratios.items():
        print(f"{key}: {value:+.1%}")


if __name__ == "__main__":
    main()

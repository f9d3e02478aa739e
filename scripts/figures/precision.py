"""Issue 22 figure: bf16 against fp32 on the CPU: clean accuracy and training time per optimizer step of the same
DP job (autocast of the forward only; clipping and noise stay fp32, train/precision.py).

    python scripts/figures/precision.py              # the default job (40 epochs), seeds 0 and 1
    python scripts/figures/precision.py --quick      # experiment=smoke, audits off

On CPUs without native bf16 matrix units (AVX-512 BF16 / AMX), bf16 is emulated and slower than fp32: the figure
says which this machine is; the GPU suite (benchmarks/gpu_suite.sh) measures the speed-up that matters.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from common import run_cli, write

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file


def cpu_bf16_units() -> list[str]:
    """The CPU's native bf16 instructions (AVX-512 BF16, AMX), from /proc/cpuinfo; [] means emulated."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def main() -> None:
    parser = RefusingParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the job's own)")
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    base = ["experiment=smoke", "audit=off", "robustness.evaluate=false"] if args.quick else ["audit=off"]
    base += ["privacy.budget_scope=run", f"train.device={args.device}"]
    base += [f"train.epochs={args.epochs}"] if args.epochs else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for precision in ("32", "bf16"):
                run_dir = Path(tmp) / f"{precision}-{seed}"
                report, seconds = run_cli([*base, f"train.precision={precision}", f"train.seed={seed}"], run_dir)
                steps = report["privacy"]["steps"]
                rows.append({
                    "precision": precision, "seed": seed, "clean_accuracy": report["metrics"]["clean_accuracy"],
                    "epsilon": report["privacy"]["epsilon"], "steps": steps,
                    "train_seconds": report["run"]["timings"]["train"],
                    "seconds_per_step": report["run"]["timings"]["train"] / max(1, steps), "wall_seconds": seconds,
                })  # fmt: skip
                print(rows[-1])
    by = {p: [r for r in rows if r["precision"] == p] for p in ("32", "bf16")}

    def mean(precision: str, key: str) -> float:
        return sum(r[key] for r in by[precision]) / len(by[precision])

    # Paired per seed (the two runs of a seed ran back to back): robust to the load drifting between seeds.
    paired = [
        fp32["seconds_per_step"] / bf16["seconds_per_step"] for fp32, bf16 in zip(by["32"], by["bf16"], strict=True)
    ]
    result = {
        "cpu_bf16_units": cpu_bf16_units(),
        "job": ("quick (experiment=smoke)" if args.quick else "default job, audits off") + f", epochs {args.epochs}",
        "device": args.device,
        "rows": rows,
        "ratios": {
            "bf16_vs_fp32_step_time": round(mean("32", "seconds_per_step") / mean("bf16", "seconds_per_step"), 3),
            "accuracy_bf16_minus_fp32": round(mean("bf16", "clean_accuracy") - mean("32", "clean_accuracy"), 4),
            "paired_step_time_ratios": [round(r, 3) for r in paired],
            "median_paired_step_time_ratio": round(statistics.median(paired), 3),
        },
        "note": "ratio > 1: bf16 faster. 2 shared cores; bf16 without CPU bf16 units is emulated",
    }
    print(write(f"precision_bf16_{args.device}", result, args.out))
    print(result["ratios"])


if __name__ == "__main__":
    main()

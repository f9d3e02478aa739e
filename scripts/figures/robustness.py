"""Issue 3's accuracy figure: does PGD adversarial training buy >= 30 points of robust accuracy on digits
for <= 5 points of clean accuracy, under the same (stronger) evaluation attack?

Runs the real command line, non-private, per seed: ``robustness=none`` and ``robustness=pgd_at`` (plus
``robustness=fgsm_rs``, and ``pgd_at`` composed with ``privacy=dpsgd`` for reference), reads each report.json
and writes ``benchmarks/results/cpu/robustness.json`` and a markdown table.

    .venv/bin/python scripts/figures/robustness.py [--seeds 0 1 2] [--out FILE]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import RESULTS, run_cli, write

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

CASES = {
    "standard": ["privacy=none", "robustness=none"],
    "pgd_at": ["privacy=none", "robustness=pgd_at"],
    "fgsm_rs": ["privacy=none", "robustness=fgsm_rs"],
    "pgd_at+dpsgd": ["privacy=dpsgd", "robustness=pgd_at"],
}


def run(case: list[str], seed: int, run_dir: Path) -> dict:
    report, _ = run_cli([*case, f"train.seed={seed}", "audit=off"], run_dir)
    return {
        "clean_accuracy": report["metrics"]["clean_accuracy"],
        "robust_accuracy": report["robustness"]["robust_accuracy"],
        "attack": report["robustness"]["attack"],
        "epsilon": report["privacy"]["epsilon"],
        "train_seconds": report["run"]["timings"]["train"],
    }


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=output_file, default=RESULTS / "robustness.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, case in CASES.items():
                rows.append({"case": name, "seed": seed, **run(case, seed, Path(tmp) / f"{name}-{seed}")})
                print(f"seed {seed} {name}: {rows[-1]}", file=sys.stderr)

    def mean(case: str, key: str) -> float:
        return statistics.mean(r[key] for r in rows if r["case"] == case)

    per_seed_gain = [
        next(r for r in rows if r["case"] == "pgd_at" and r["seed"] == s)["robust_accuracy"]
        - next(r for r in rows if r["case"] == "standard" and r["seed"] == s)["robust_accuracy"]
        for s in args.seeds
    ]
    per_seed_cost = [
        next(r for r in rows if r["case"] == "standard" and r["seed"] == s)["clean_accuracy"]
        - next(r for r in rows if r["case"] == "pgd_at" and r["seed"] == s)["clean_accuracy"]
        for s in args.seeds
    ]
    summary = {
        "robust_gain_points_min": 100 * min(per_seed_gain),
        "clean_cost_points_max": 100 * max(per_seed_cost),
        "goal": "robust gain >= 30 points for <= 5 points of clean accuracy (issue 3)",
    }
    summary["met"] = summary["robust_gain_points_min"] >= 30 and summary["clean_cost_points_max"] <= 5
    result = {"figure": "adversarial training on digits", "seeds": args.seeds, "rows": rows, "summary": summary}
    write("robustness", result, args.out)
    print(f"attack: {rows[0]['attack']}\n")
    print("| case | clean accuracy | robust accuracy | epsilon | train s |\n|---|---|---|---|---|")
    for case in CASES:
        eps = [r["epsilon"] for r in rows if r["case"] == case][0]
        print(
            f"| {case} | {mean(case, 'clean_accuracy'):.3f} | {mean(case, 'robust_accuracy'):.3f} | "
            f"{'-' if eps is None else f'{eps:.2f}'} | {mean(case, 'train_seconds'):.0f} |"
        )
    print(f"\nmeans over seeds {args.seeds}; {summary}")


if __name__ == "__main__":
    main()

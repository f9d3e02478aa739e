"""Issue 24's two repair bars as rates: per cell of one or more backdoor matrices, how many seeds meet each bar.

Three seeds per cell (the matrix's default) cannot tell a cell that passes 1 time in 3 from one that passes 9 times
in 10, so the table pools every seed the given matrix files hold (``backdoor_matrix.py --seeds 3 4 5 6 7 8`` beside
the default seeds 0-2) and gives each rate a 95% Clopper-Pearson interval (scipy's ``binomtest``). A row counted
twice (the same case and seed in two files) is refused: pooled files must hold different seeds, unless
``--supersede`` says that a later file re-ran those cells (after a code change that moved only them): then its row
replaces the earlier one, and the JSON lists every replaced case and seed under ``superseded``.

    python scripts/figures/backdoor_pass_rates.py benchmarks/results/cpu/backdoor_matrix.json \\
        benchmarks/results/cpu/backdoor_matrix_seeds3to8.json --out benchmarks/results/cpu/backdoor_pass_rates.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backdoor import GOALS  # noqa: E402

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file


def _rate(passed: int, runs: int) -> dict:
    low, high = binomtest(passed, runs).proportion_ci(confidence_level=0.95, method="exact")
    return {"passed": passed, "runs": runs, "rate": round(passed / runs, 3), "ci95": [round(low, 3), round(high, 3)]}


def _cell(rate: dict) -> str:
    return f"{rate['passed']}/{rate['runs']} [{rate['ci95'][0]:.2f}, {rate['ci95'][1]:.2f}]"


def pass_rates(rows: list[dict]) -> dict[str, dict]:
    """Per case: the ASR bar, the clean-drop bar, both, and the means and worst values they are judged on."""
    seen = [(r["case"], r["seed"]) for r in rows]
    twice = sorted({key for key in seen if seen.count(key) > 1})
    if twice:
        case, seed = twice[0]
        print(f"backdoor_pass_rates: error: {case} seed {seed} is in two files: pool files of different seeds",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    out = {}
    for case in sorted({r["case"] for r in rows}):
        mine = [r for r in rows if r["case"] == case]
        asr = [r["asr_after"] <= GOALS["asr_after_max"] for r in mine]
        drop = [r["clean_drop"] <= GOALS["clean_drop_max"] for r in mine]
        out[case] = {
            "seeds": sorted(r["seed"] for r in mine),
            "asr_after_ok": _rate(sum(asr), len(mine)),
            "clean_drop_ok": _rate(sum(drop), len(mine)),
            "both_ok": _rate(sum(a and d for a, d in zip(asr, drop, strict=True)), len(mine)),
            "asr_after.mean": round(float(np.mean([r["asr_after"] for r in mine])), 4),
            "asr_after.worst": round(max(r["asr_after"] for r in mine), 4),
            "clean_drop.mean": round(float(np.mean([r["clean_drop"] for r in mine])), 4),
            "clean_drop.worst": round(max(r["clean_drop"] for r in mine), 4),
            "target_share_p_below_0.05": sum(
                1 for r in mine if r.get("target_share_p_after") is not None and r["target_share_p_after"] < 0.05
            ),
        }
    return out


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrices", nargs="+", type=Path, help="backdoor_matrix.py outputs, with different seeds")
    parser.add_argument("--out", type=output_file, default=None)
    parser.add_argument("--supersede", action="store_true",
                        help="a case and seed in a later file replaces the same one in earlier files")  # fmt: skip
    args = parser.parse_args()
    for path in args.matrices:
        if not path.is_file():
            parser.error(f"{path} is not a file: give backdoor_matrix.py outputs")
    rows, superseded = [], []
    for path in args.matrices:
        for row in json.loads(path.read_text())["rows"]:
            if "failed" in row:
                continue
            earlier = [r for r in rows if (r["case"], r["seed"]) == (row["case"], row["seed"])]
            if args.supersede and earlier:
                rows = [r for r in rows if r not in earlier]
                superseded.append({"case": row["case"], "seed": row["seed"], "by": str(path)})
            rows.append(row)
    result = {"benchmark": "backdoor_pass_rates", "goals": GOALS, "inputs": [str(p) for p in args.matrices],
              "superseded": superseded, "cells": pass_rates(rows)}  # fmt: skip
    total = [c["both_ok"] for c in result["cells"].values()]
    result["both_ok"] = _rate(sum(t["passed"] for t in total), sum(t["runs"] for t in total))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| case | seeds | ASR <= 0.05 | drop <= 2 points | both | ASR after mean (worst) | drop mean (worst) |")
    print("|---|---|---|---|---|---|---|")
    for case, c in result["cells"].items():
        rates = [_cell(c[k]) for k in ("asr_after_ok", "clean_drop_ok", "both_ok")]
        asr = f"{c['asr_after.mean']:.3f} ({c['asr_after.worst']:.3f})"
        drop = f"{100 * c['clean_drop.mean']:+.1f} ({100 * c['clean_drop.worst']:+.1f})"
        print(f"| {case} | {len(c['seeds'])} | {' | '.join(rates)} | {asr} | {drop} |")
    b = result["both_ok"]
    print(f"all cells: both bars in {b['passed']} of {b['runs']} runs ({b['rate']:.3f}, 95% CI {b['ci95']})")


if __name__ == "__main__":
    main()

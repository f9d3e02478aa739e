"""Repaired backdoored models against their never-poisoned twins, cell by cell (issue 24's floor, as a test).

``backdoor_floor.py`` trains, for each matrix cell and seed, the twin that never saw a poisoned row and repairs it
the same way; ``backdoor_matrix.py`` gives the repaired backdoored model of that cell and seed. This pairs them by
(case, seed) and asks, per case, whether the backdoored models' ASR after repair lies above the twins':

* ``wilcoxon_p``: scipy's one-sided Wilcoxon signed-rank test on the per-seed differences (backdoored - twin);
* ``mannwhitney_p``: the one-sided Mann-Whitney U test on the two samples, unpaired (under DP each run draws its
  own secret noise, so a twin shares its seed's split, reserve and trigger with the backdoored run, not its model);
* ``above_every_twin``: the seeds whose backdoored ASR is above the highest twin ASR of the case;
* how many runs of each kind miss "ASR <= 0.05".

A small p says the repair leaves more pull to the target than the data gives a model with no backdoor; a large one
says the ASR left is what a never-poisoned model shows too. Matrix files are read in order and a later file's row
replaces an earlier one's for the same case and seed (as ``backdoor_pass_rates.py --supersede``).

    python scripts/figures/backdoor_twin_pairs.py --matrices benchmarks/results/cpu/backdoor_matrix.json \\
        benchmarks/results/cpu/backdoor_matrix_seeds3to8_natural_dp_erase.json \\
        --twins benchmarks/results/cpu/backdoor_floor_erase_natural_dp.jsonl \\
        --out benchmarks/results/cpu/backdoor_twin_pairs.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu, wilcoxon

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

BAR = 0.05  # issue 24's ASR bar


def matrix_rows(paths: list[Path]) -> dict[tuple[str, int], dict]:
    rows: dict[tuple[str, int], dict] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            if "failed" not in row:
                rows[(row["case"], row["seed"])] = row  # a later file re-ran the cell
    return rows


def twin_rows(paths: list[Path]) -> dict[tuple[str, int], dict]:
    rows: dict[tuple[str, int], dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "failed" not in row:
                rows[(row["case"], row["seed"])] = row
    return rows


def compare(backdoored: list[float], twins: list[float]) -> dict:
    """The one case's figures (see the module docstring); needs at least one pair."""
    b, t = np.asarray(backdoored), np.asarray(twins)
    diff = b - t
    out = {
        "pairs": len(b),
        "backdoored_asr_mean": round(float(b.mean()), 4),
        "twin_asr_mean": round(float(t.mean()), 4),
        "difference_median": round(float(np.median(diff)), 4),
        "backdoored_above_bar": int((b > BAR).sum()),
        "twins_above_bar": int((t > BAR).sum()),
    }
    if len(b) >= 2 and np.any(diff != 0):
        out["wilcoxon_p"] = round(float(wilcoxon(b, t, alternative="greater").pvalue), 4)
        out["mannwhitney_p"] = round(float(mannwhitneyu(b, t, alternative="greater").pvalue), 4)
    return out


def pairs(matrix: dict, twins: dict) -> dict[str, dict]:
    cases: dict[str, dict] = {}
    for key in sorted(matrix.keys() & twins.keys()):
        case = cases.setdefault(key[0], {"seeds": [], "backdoored": [], "twin": []})
        case["seeds"].append(key[1])
        case["backdoored"].append(matrix[key]["asr_after"])
        case["twin"].append(twins[key]["asr_floor_after"])
    out = {}
    for name, case in cases.items():
        highest_twin = max(case["twin"])
        above = [s for s, b in zip(case["seeds"], case["backdoored"], strict=True) if b > highest_twin]
        out[name] = {
            **compare(case["backdoored"], case["twin"]),
            "above_every_twin": above,
            "per_seed": [
                {"seed": s, "backdoored_asr": round(b, 4), "twin_asr": round(t, 4)}
                for s, b, t in zip(case["seeds"], case["backdoored"], case["twin"], strict=True)
            ],
        }
    return out


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", nargs="+", type=Path, required=True, help="backdoor_matrix.py outputs")
    parser.add_argument("--twins", nargs="+", type=Path, required=True, help="backdoor_floor.py outputs (.jsonl)")
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    try:
        matrix, twins = matrix_rows(args.matrices), twin_rows(args.twins)
    except (OSError, ValueError, KeyError, TypeError) as bad:  # missing, unreadable or not these scripts' output
        parser.error(f"cannot read the inputs ({type(bad).__name__}: {bad}): --matrices takes backdoor_matrix.py "
                     "JSON files, --twins backdoor_floor.py JSON-lines files")  # fmt: skip
    result = pairs(matrix, twins)
    if not result:
        parser.error("no (case, seed) is in both the matrices and the twins")
    print(f"{'case':<24} {'pairs':>5} {'backdoored':>10} {'twin':>6} {'> bar b/t':>9} {'wilcoxon p':>10} {'MW p':>6}")
    for name, r in result.items():
        print(f"{name:<24} {r['pairs']:>5} {r['backdoored_asr_mean']:>10.3f} {r['twin_asr_mean']:>6.3f} "
              f"{r['backdoored_above_bar']:>4}/{r['twins_above_bar']:<4} {r.get('wilcoxon_p', float('nan')):>10.3f} "
              f"{r.get('mannwhitney_p', float('nan')):>6.3f}  above every twin: {r['above_every_twin']}")  # fmt: skip
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "bar": BAR,
                    "matrices": [str(p) for p in args.matrices],
                    "twins": [str(p) for p in args.twins],
                    "cases": result,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

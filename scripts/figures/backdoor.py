"""The backdoor figures of issue 4, measured by running the real ``aisec-train`` command line.

Cases (each the unchanged ``experiment=backdoor`` preset, ``audit=off`` because the audits measure other things):

- ``digits``: scikit-learn's handwritten digits, 8x8, the default dataset;
- ``typeset-digits``: digits 0-9 typeset in 22 fonts at 12x12 (``scripts/figures/glyphs.py``), through
  ``dataset=npz dataset.path=FILE``: the "beyond the bundled data" check, with no retuning;
- ``typeset-letters`` (one seed, a stress case): letters A-J from the same generator; the 3x3 white corner looks
  like the foot of an "A" (class 0), so part of its ASR is the trigger's natural success, not the backdoor.

Writes ``benchmarks/results/cpu/backdoor.json`` ({benchmark, device, rows, ratios, goals}) and prints a markdown
table. ``--quick`` runs one seed of two epochs per dataset (a smoke check of the script, not the figures).

    python scripts/figures/backdoor.py --seeds 0 1 2 --jobs 2
    python scripts/figures/backdoor.py --cases digits --set backdoor.patch_size=2 --out /tmp/patch2.json
    python scripts/figures/backdoor.py --cases digits --set model=resnet18_gn --out /tmp/resnet.json   # any model
    python scripts/figures/backdoor.py --attack badnets blended wanet --set privacy=none   # the three attacks
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import own_stores  # noqa: E402
from glyphs import make  # noqa: E402

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

REPO = Path(__file__).resolve().parents[2]
GOALS = {"asr_before_min": 0.9, "asr_after_max": 0.05, "clean_drop_max": 0.02, "spectral_recall_min": 0.8}


def _run(case: str, seed: int, overrides: list[str], work: Path, quick: bool) -> dict:
    run_dir = work / f"{case.replace('/', '-')}-seed{seed}"
    args = ["experiment=backdoor", "audit=off", f"train.seed={seed}", f"hydra.run.dir={run_dir}", *overrides]
    if quick:
        args += ["train.epochs=2", "backdoor.finetune_epochs=2", "robustness.evaluate=false"]
    # Each seed is its own experiment with its own ledger store: seeds sharing the project's would compose their
    # budgets (the second refused) and contend for the dataset's ledger lock under --jobs.
    env = {**own_stores(run_dir, always=True), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    command = [sys.executable, "-m", "aisec_train", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{case} seed {seed} failed: {done.stderr[-2000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    return _row(case, seed, report, time.perf_counter() - started, args)


def _row(case: str, seed: int, report: dict, seconds: float, args: list[str]) -> dict:
    bd, det = report["backdoor"], report["backdoor"]["detections"]
    drop = bd["clean_accuracy_before"] - bd["clean_accuracy_after"]
    return {
        "impl": f"{case}/seed{seed}",
        "case": case,
        "attack": report["backdoor"]["attack"],
        "seed": seed,
        "seconds": round(seconds, 1),
        "defence_seconds": report["run"]["timings"]["backdoor_defend"],
        "fine_pruning_seconds": bd["fine_pruning"]["seconds"],
        "n_train": report["data"]["n_train"],
        "n_poisoned": bd["n_poisoned"],
        "epsilon": report["privacy"]["epsilon"],
        "asr_before": bd["asr_before"],
        "asr_after": bd["asr_after"],
        "clean_before": bd["clean_accuracy_before"],
        "clean_after": bd["clean_accuracy_after"],
        "clean_drop": drop,
        "ra_after": bd["robust_accuracy_after"],
        "der": bd["der"],
        "spectral_precision": det["spectral"]["precision"],
        "spectral_recall": det["spectral"]["recall"],
        "ac_precision": det["activation_clustering"]["precision"],
        "ac_recall": det["activation_clustering"]["recall"],
        "pruned_fraction": bd["fine_pruning"]["pruned_fraction"],
        "feature_layer": bd["feature_layer"],
        "bake": (bd["fine_pruning"].get("bake") or {}).get("method"),
        "finetune_head": bd["fine_pruning"]["finetune"].get("head"),
        "erase_check": bd["fine_pruning"]["finetune"].get("erase_check"),  # boxes used? (backdoor.repair_erase)
        "distilled": bd["fine_pruning"]["finetune"]["distill"]["used"],
        "teacher_trusted_accuracy": bd["fine_pruning"]["finetune"]["distill"]["teacher_trusted_accuracy"],
        "distill_mode": bd["fine_pruning"]["finetune"]["distill"].get("mode"),
        "held_out_teacher_accuracy": bd["fine_pruning"]["finetune"]["distill"].get("held_out_teacher_accuracy"),
        "held_out_student_accuracy": bd["fine_pruning"]["finetune"]["distill"].get("held_out_student_accuracy"),
        "excluded_class": bd["fine_pruning"]["finetune"]["distill"].get("excluded_class"),
        "target": bd.get("target"),
        "unlabelled_rows": bd["fine_pruning"]["finetune"]["distill"].get("unlabelled_rows"),
        # relearning (backdoor/relearn.py): which model was released, and the Fine-Pruned one's figures beside it
        "released": _released(bd),
        "fine_pruned_clean": (bd["stages"].get("fine_pruned") or {}).get("clean_accuracy"),
        "fine_pruned_asr": (bd["stages"].get("fine_pruned") or {}).get("asr"),
        "relearn_cleared_rows": (bd["fine_pruning"].get("relearn") or {}).get("cleared_rows"),
        "relearn_poisoned_kept": (bd["fine_pruning"].get("relearn") or {}).get("poisoned_kept"),  # the retrain read
        "relearn_poisoned_kept_by_round": (bd["fine_pruning"].get("relearn") or {}).get("poisoned_kept_by_round"),
        "relearn_max_class_shift": max((bd["fine_pruning"].get("relearn") or {}).get("shift") or [None], key=_num),
        # the target's share of the repaired model's errors on triggered inputs, and its p against chance
        "target_share_after": bd["errors_to_target"]["after"]["share"],
        "asr_from_errors_after": bd["errors_to_target"]["after"]["asr_from_errors"],
        "target_share_p_after": bd["errors_to_target"]["after"]["p_value"],
        "meets_goals": bool(
            bd["asr_before"] >= GOALS["asr_before_min"]
            and bd["asr_after"] <= GOALS["asr_after_max"]
            and drop <= GOALS["clean_drop_max"]
            and det["spectral"]["recall"] >= GOALS["spectral_recall_min"]
        ),
        "command": "aisec-train " + " ".join(a for a in args if not a.startswith("hydra.run.dir")),
    }


def _released(bd: dict) -> str:
    """``relearned`` when backdoor/relearn.py's model was released, else ``repaired`` (also when it did not run)."""
    return ((bd.get("fine_pruning") or {}).get("relearn") or {}).get("released", "repaired")


def _num(value) -> float:
    return float("-inf") if value is None else value


CASES = ("digits", "typeset-digits", "typeset-letters")
ATTACKS = ("badnets", "blended", "wanet")  # aisec_train/backdoor/attacks.py


def _cases(
    work: Path, seeds: list[int], names: list[str], extra: list[str], attacks: tuple[str, ...] = ("badnets",)
) -> list[tuple[str, int, list[str]]]:
    """(case label, seed, overrides) per dataset case and attack; a label is the case, plus ``/attack`` for the
    attacks other than BadNets (``digits/wanet``)."""
    cases = []
    for name, attack in [(n, a) for a in attacks for n in names]:
        overrides = [*extra, f"backdoor.attack={attack}"] if attack != "badnets" else list(extra)
        label = name if attack == "badnets" else f"{name}/{attack}"
        if name.startswith("typeset-"):
            x, y = make(n=1800, size=12, seed=0, alphabet=name.split("-")[1])
            path = work / f"{name}.npz"
            if not path.exists():
                np.savez_compressed(path, x=x, y=y)
            overrides += ["dataset=npz", f"dataset.path={path}"]
        # the letters are a stress case (see the module docstring): one seed is enough to show it
        cases += [(label, s, overrides) for s in (seeds[:1] if name == "typeset-letters" else seeds)]
    return cases


def _summary(rows: list[dict]) -> dict[str, float]:
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        for key in ("asr_before", "asr_after", "clean_drop", "spectral_recall"):
            out[f"{case}.{key}.mean"] = float(np.mean([r[key] for r in mine]))
            worst = min if key in ("asr_before", "spectral_recall") else max
            out[f"{case}.{key}.worst"] = float(worst(r[key] for r in mine))
    return out


def markdown(rows: list[dict]) -> str:
    cols = [
        ("case", "case"),
        ("seed", "seed"),
        ("epsilon", "eps"),
        ("asr_before", "ASR before"),
        ("asr_after", "ASR after"),
        ("clean_before", "acc before"),
        ("clean_after", "acc after"),
        ("ra_after", "RA after"),
        ("der", "DER"),
        ("spectral_precision", "spectral P"),
        ("spectral_recall", "spectral R"),
        ("ac_precision", "AC P"),
        ("ac_recall", "AC R"),
        ("pruned_fraction", "pruned"),
        ("fine_pruning_seconds", "FP s"),
        ("meets_goals", "goals"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with OMP_NUM_THREADS=1)")
    parser.add_argument("--quick", action="store_true", help="two epochs (one seed unless --seeds): checks the script")
    parser.add_argument("--out", type=output_file, default=REPO / "benchmarks" / "results" / "cpu" / "backdoor.json")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--attack", nargs="+", choices=ATTACKS, default=["badnets"], help="backdoor.attack values")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override, e.g. KEY=VALUE")
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    work = args.work or Path(tempfile.mkdtemp(prefix="aisec-backdoor-figures-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = _cases(work, seeds, args.cases, args.overrides, tuple(args.attack))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda c: _run(*c, work=work, quick=args.quick), cases))
    result = {
        "benchmark": "backdoor_figures",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "quick": args.quick,
        "overrides": args.overrides,
        "goals": GOALS,
        "rows": rows,
        "ratios": {},
        "summary": _summary(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"## Backdoor figures ({result['device']}; runs in {work})\n")
    print(markdown(rows))
    print()
    for key, value in result["summary"].items():
        print(f"- {key}: {value:.3f}")


if __name__ == "__main__":
    main()

"""Issue 20's last figure: the membership audit and the one-run audit on the default job, before and after the
secret-randomness and record-identity work.

Both trees run the real command line, ``python -m aisec_train audit.privacy_audit=on train.seed=S``: the default
job (DP-SGD, epsilon 3, digits) with the one-run audit (Steinke, Nasr & Jagielski 2023; 500 mislabelled canaries)
beside the membership audit (loss, offline LiRA and RMIA). The BEFORE tree is a git worktree of the commit before
the change (``git worktree add /tmp/before 85eb709``), imported through ``PYTHONPATH`` with this venv's python
(the venv's editable install points at this checkout, so the path must win; each run checks that it does). AFTER
is this checkout.

Every run has its own ledger store, key file, registry and user data folder in ``--workdir``, so neither tree
spends the project's digits budget, nor the other's, nor the user's.

For a DP model "unchanged or stronger" cannot mean a higher attack AUC: the audits are the same code in both trees
(only where the noise and batches come from changed), so what should hold is that the membership AUCs stay near
0.5 and the empirical epsilon lower bound stays below the claimed epsilon, within the seed-to-seed spread. Before
the change the seed fixed the noise; after, it comes from OS entropy, so the AFTER spread also includes the noise.

    .venv/bin/python scripts/figures/audit_before_after.py --before-tree /tmp/before [--seeds 0 1 2] [--jobs 2]

Writes ``benchmarks/results/cpu/audit_before_after.json`` (``--out``) and a markdown table on stdout. Finished
runs are kept in ``OUT.progress.jsonl`` (``common.Progress``) and re-used by a re-run with the same trees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, RESULTS, Progress, write

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

ATTACKS = ("loss", "lira_offline", "rmia")
JOB = ["audit.privacy_audit=on"]  # the default job with the one-run audit on; nothing else changed


def tree_commit(tree: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True, check=True)
    return head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def tree_env(tree: Path, home: Path) -> dict[str, str]:
    """The run's environment: TREE first on the import path, every store of its own under HOME."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": "1",
        "XDG_DATA_HOME": str(home / "xdg"),
        "AISEC_TRAIN_LEDGER_STORE": str(home / "ledgers"),
        "AISEC_TRAIN_KEY_FILE": str(home / "key"),
        "AISEC_TRAIN_REGISTRY": str(home / "registry.json"),
    }


def check_import(tree: Path, env: dict[str, str]) -> None:
    """Refuse to measure a tree whose python would import another checkout's code or configs. The venv's
    editable install maps ``aisec_train.configs`` to this checkout's ``configs/``: a worktree gets a link
    ``aisec_train/configs -> ../configs`` so that its own Hydra configs are the ones composed."""
    probe = "import aisec_train; from importlib.resources import files; "
    probe += "print(aisec_train.__file__); print(files('aisec_train.configs'))"
    for attempt in range(2):
        found = subprocess.run(
            [sys.executable, "-c", probe], cwd=tree, env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        wrong = [w for w in found if tree.resolve() not in Path(w).resolve().parents]
        link = tree / "aisec_train" / "configs"
        if not wrong:
            return
        if attempt == 0 and not link.exists() and (tree / "configs" / "config.yaml").is_file():
            link.symlink_to(Path("..") / "configs")
            continue
        raise SystemExit(f"{tree}: python imports {wrong} from outside this tree")


def run_job(label: str, tree: Path, seed: int, workdir: Path) -> dict[str, Any]:
    home = workdir / f"{label}-{seed}"
    env = tree_env(tree, home)
    check_import(tree, env)
    run_dir = home / "run"
    args = [*JOB, f"train.seed={seed}", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "aisec_train", *args]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label} seed {seed}: aisec-train {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    row = extract(report)
    row.update(tree=label, seed=seed, args=args[:-1], commit=tree_commit(tree), run_seconds=seconds)
    print(
        f"{label} seed {seed}: AUC {row['membership_auc']:.3f} bound {row['epsilon_lower_bound']:.3f} "
        f"claim {row['epsilon']:.3f} acc {row['clean_accuracy']:.3f} ({seconds:.0f} s)",
        file=sys.stderr,
    )
    return row


def extract(report: dict) -> dict[str, Any]:
    membership, audit = report["audit"]["membership"], report["audit"]["privacy_audit"]
    row: dict[str, Any] = {
        "membership_auc": membership["auc"],
        "membership_tpr_at_fpr_0_001": membership["tpr_at_fpr_0_001"],
        "strongest_attack": membership.get("strongest_attack"),
        "epsilon_lower_bound": audit["epsilon_lower_bound"],
        "one_run_correct": audit["correct"],
        "one_run_guesses": audit["guesses"],
        "one_run_epsilon_max": audit["epsilon_max"],
        "epsilon": report["privacy"]["epsilon"],
        "noise_multiplier": report["privacy"].get("noise_multiplier"),
        "randomness": report["privacy"].get("randomness"),  # absent before the change
        "clean_accuracy": report["metrics"]["clean_accuracy"],
        "timings": report["run"]["timings"],
    }
    for attack in ATTACKS:
        found = membership.get("attacks", {}).get(attack)
        if found:
            row[f"{attack}_auc"] = found["auc"]
            row[f"{attack}_tpr_at_fpr_0_001"] = found["tpr_at_fpr_0_001"]
    return row


METRICS = (
    "membership_auc",
    "membership_tpr_at_fpr_0_001",
    *(f"{a}_{m}" for a in ATTACKS for m in ("auc", "tpr_at_fpr_0_001")),
    "epsilon_lower_bound",
    "epsilon",
    "clean_accuracy",
)


def stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": len(arr),
    }


def summarise(rows: list[dict]) -> dict[str, Any]:
    by = {(r["tree"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if ("before", r["seed"]) in by and ("after", r["seed"]) in by})
    out: dict[str, Any] = {"seeds": seeds}
    if not seeds:
        return out  # no seed measured in both trees yet
    for metric in METRICS:
        if not all(metric in by[(t, s)] for t in ("before", "after") for s in seeds):
            continue
        before = [by[("before", s)][metric] for s in seeds]
        after = [by[("after", s)][metric] for s in seeds]
        out[metric] = {
            "before": stats(before),
            "after": stats(after),
            # paired by seed: same split, targets and canary draw (both chosen by the seed)
            "after_minus_before": stats([a - b for a, b in zip(after, before, strict=True)]),
        }
    out["bound_below_claim"] = {
        t: all(by[(t, s)]["epsilon_lower_bound"] <= by[(t, s)]["epsilon"] for s in seeds) for t in ("before", "after")
    }
    # the bound is 0 whenever the guesses are too few to refute epsilon 0: show how far from that each run was
    out["one_run_correct_of_guesses"] = {
        tree: [f"{by[(tree, s)]['one_run_correct']}/{by[(tree, s)]['one_run_guesses']}" for s in seeds]
        for tree in ("before", "after")
    }
    out["seeds"] = seeds
    return out


def table(summary: dict) -> str:
    if not summary["seeds"]:
        return "no seed measured in both trees yet"
    lines = ["| metric | before (mean ± sd) | after (mean ± sd) | after − before (mean ± sd) |", "|---|---|---|---|"]
    for metric in METRICS:
        if metric in summary:
            s = summary[metric]
            cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in ("before", "after", "after_minus_before")]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append(f"\nseeds {summary['seeds']}; bound <= claimed epsilon in every run: {summary['bound_below_claim']}")
    lines.append(f"one-run audit, correct/guesses per seed: {summary['one_run_correct_of_guesses']}")
    return "\n".join(lines)


def main() -> None:
    parser = RefusingParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-tree", type=Path, required=True, help="git worktree of the commit before")
    parser.add_argument("--after-tree", type=Path, default=REPO)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=("before", "after"), help="measure one tree (the other from progress)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each its own stores)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--out", type=output_file, default=RESULTS / "audit_before_after.json")
    args = parser.parse_args()
    for tree in (args.before_tree, args.after_tree):
        if not (tree / "aisec_train" / "__init__.py").is_file():
            print(f"--before-tree/--after-tree {tree}: not an aisec-train checkout", file=sys.stderr)
            raise SystemExit(2)
    trees = {"before": args.before_tree.resolve(), "after": args.after_tree.resolve()}
    commits = {label: tree_commit(tree) for label, tree in trees.items()}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="audit_before_after-"))
    # Keyed by the job and the BEFORE commit only: AFTER is a working tree that others commit from meanwhile (each
    # row records the commit it ran on), and the configs link makes the before worktree look modified.
    progress = Progress(args.out, job=JOB, before=commits["before"].removesuffix("+uncommitted"))
    todo = [(label, seed) for seed in args.seeds for label in trees if args.only in (None, label)]
    started = time.perf_counter()

    def one(item: tuple[str, int]) -> dict:
        label, seed = item
        key = f"{label}_{seed}"
        return progress.get(key) or progress.add(key, run_job(label, trees[label], seed, workdir))

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    # --only measured one tree: pair it with the other tree's rows already in the progress file
    keys = [f"{label}_{seed}" for seed in args.seeds for label in trees]
    rows = [progress.done[key] for key in keys if key in progress.done]
    summary = summarise(rows)
    result = {
        "figure": "audit_before_after",
        "device": "cpu",
        "job": ["python -m aisec_train", *JOB, "train.seed=S"],
        "commits": commits,
        "rows": rows,
        "summary": summary,
        "seconds": time.perf_counter() - started,
        "note": "2-core machine shared by 8 engineers: run_seconds and timings are noisy",
    }
    path = write("audit_before_after", result, args.out)
    print(table(summary))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Issue 11's figures: the kill drill, the concurrency drill, the forgery drill, the fuzz count and the overhead
of keyed tags, safe writes and locks on the default job. Writes benchmarks/results/cpu/integrity.json and prints a
markdown table. Every job is the real ``aisec-train`` (the drills of tests/drills.py, tests/forgeries.py and
tests/fuzzing.py, run at figure sizes); the key, anchors, ledger stores and registries live in a temporary folder.

    .venv/bin/python scripts/figures/integrity.py                 # 21 kills, 2 and 4 jobs, 300 fuzz cases (~25 min)
    .venv/bin/python scripts/figures/integrity.py --quick         # 3 kills, 2 jobs, 40 fuzz cases, smoke job (~6 min)
    .venv/bin/python scripts/figures/integrity.py --only overhead # one part: kill, concurrency, forgery, fuzz, overhead

Overhead is measured, not estimated: the job runs with ``AISEC_TRAIN_STORE_TIMING`` set, so every store operation
(HMAC tags and checks, no-follow atomic writes with their fsyncs, artifact commits and verified reads, ledger
commits and reads, lock acquisition and release, budget composition) is timed in the job itself
(aisec_train/store/timing.py); nested operations count once, and the serialization of checkpoint content
(``torch.save``), which any job does, is subtracted. The result is divided by the job's wall time; the Opacus
accounting of the dataset's composed budget (``budget``) is reported beside it, not in it.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

sys.path.insert(0, str(REPO))  # the drills live beside the tests that hold them

QUICK = {"kills": 3, "kill_epochs": 3, "jobs": (2,), "fuzz": 20, "job": ["experiment=smoke"]}
FULL = {"kills": 21, "kill_epochs": 40, "jobs": (2, 4), "fuzz": 150, "job": []}
PARTS = ("kill", "concurrency", "forgery", "fuzz", "overhead")


def kill(work: Path, size: dict) -> dict:
    from tests.drills import Lab, kill_drill

    result = kill_drill(Lab(work / "kill"), kills=size["kills"], epochs=size["kill_epochs"], seed=0)
    result["ledger_equals_report"] = result["ledger_steps"] == result["report_steps"]
    result["ledger_covers_checkpoints"] = result["ledger_steps"] >= result["max_checkpoint_steps"]
    return result


def concurrency(work: Path, size: dict) -> dict:
    from tests.drills import Lab, same_dataset, same_run_dir

    rows = []
    for jobs in size["jobs"]:
        for drill, wait in itertools.product((same_run_dir, same_dataset), (False, True)):
            r = drill(Lab(work / f"conc_{drill.__name__}_{jobs}_{wait}"), jobs, wait=wait)
            r.pop("outcomes")
            rows.append({"drill": drill.__name__, **r, "within_target": r["dataset_epsilon"] <= r["target_epsilon"]})
    return {"rows": rows, "never_above_target": all(r["within_target"] for r in rows)}


def forgery(work: Path, size: dict) -> dict:
    from tests.forgeries import FORGERIES, make_base

    base = make_base(work / "forgery")
    rows = []
    for name, scenario in FORGERIES:
        (work / "forgery" / name).mkdir(parents=True)
        started = time.perf_counter()
        finding = scenario(base, work / "forgery" / name)
        rows.append({"name": finding.name, "detected": finding.detected, "evidence": finding.evidence[:400],
                     "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
    return {"rows": rows, "detected": sum(r["detected"] for r in rows), "total": len(rows)}


def fuzz(work: Path, size: dict) -> dict:
    from hypothesis import HealthCheck, given, settings

    from tests.fuzzing import BASE, bad_npz_bytes, bad_overrides, call_cli, refusal_problems

    counter, failures, tried = itertools.count(), [], {"overrides": 0, "npz": 0}
    config = settings(max_examples=size["fuzz"], deadline=None, database=None, suppress_health_check=list(HealthCheck))

    def check(kind: str, args: list[str]) -> None:
        tried[kind] += 1
        run_dir = work / "fuzz" / f"run{next(counter)}"
        problems = refusal_problems(run_dir, *call_cli([*BASE, *args, f"hydra.run.dir={run_dir}"]))
        if problems:
            failures.append({"args": args, "problems": problems})

    (work / "fuzz").mkdir()

    @config
    @given(bad_overrides(work / "fuzz"))
    def overrides(args):
        check("overrides", args)

    @config
    @given(bad_npz_bytes())
    def npz(data):
        path = work / "fuzz" / f"data{next(counter)}.npz"
        path.write_bytes(data)
        check("npz", ["dataset=npz", f"dataset.path={path}"])

    overrides()
    npz()
    return {"cases": sum(tried.values()), "by_kind": tried, "refused_cleanly": sum(tried.values()) - len(failures),
            "failures": failures}  # fmt: skip


def overhead(work: Path, size: dict) -> dict:
    import subprocess

    timing = work / "timing.jsonl"
    run_dir = work / "overhead_run"
    env = {**os.environ, "AISEC_TRAIN_STORE_TIMING": str(timing), "AISEC_TRAIN_LEDGER_STORE": str(work / "ov_store"),
           "AISEC_TRAIN_REGISTRY": str(work / "ov_registry.json")}  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "aisec_train", *size["job"], f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the timed job failed:\n{proc.stderr[-2000:]}")
    totals = json.loads(timing.read_text().splitlines()[-1])["totals"]
    outermost = sum(t["outermost_seconds"] for t in totals.values())
    payload = totals.get("payload", {}).get("seconds", 0.0)  # torch.save of checkpoint content: any job does it
    budget = totals.get("budget", {}).get("outermost_seconds", 0.0)  # Opacus accounting of the composed budget
    integrity = outermost - payload - budget  # keyed tags and checks, no-follow atomic writes, commits, locks
    stages = sum(json.loads((run_dir / "report.json").read_text())["run"]["timings"].values())
    return {
        "job": ["aisec-train", *size["job"]],
        "wall_seconds": round(wall, 2),
        "pipeline_seconds": round(stages, 2),
        "integrity_seconds": round(integrity, 4),
        "budget_composition_seconds": round(budget, 4),
        "fraction_of_wall": integrity / wall,
        "fraction_of_pipeline": integrity / stages,
        "with_budget_fraction_of_wall": (integrity + budget) / wall,
        "under_2_percent": integrity / wall < 0.02,
        "operations": {k: {n: round(x, 4) for n, x in v.items()} for k, v in sorted(totals.items())},
    }


def table(result: dict) -> str:
    rows = []
    if k := result.get("kill"):
        rows.append(
            (
                "kill drill",
                f"{k['kills']} kills {k['kills_by_kind']}, {k['launches']} launches, every resume "
                f"ok; ledger steps {k['ledger_steps']} = report {k['report_steps']} >= every checkpoint seen "
                f"({k['max_checkpoint_steps']}); ledger ahead after {k['ledger_ahead_after_kill']} kill(s)",
            )
        )
    for r in (result.get("concurrency") or {}).get("rows", []):
        rows.append(
            (
                f"{r['drill']} x{r['jobs']} {'wait' if r['wait'] else 'refuse'}",
                f"exit {r['exit_codes']}, dataset epsilon {r['dataset_epsilon']:.3f} of {r['target_epsilon']}",
            )
        )
    if f := result.get("forgery"):
        rows.append(("forgery drill", f"{f['detected']} / {f['total']} detected or prevented"))
    if z := result.get("fuzz"):
        rows.append(("fuzz", f"{z['cases']} generated cases {z['by_kind']}, {z['refused_cleanly']} refused cleanly"))
    if o := result.get("overhead"):
        rows.append(
            (
                "overhead",
                f"tags, locks, safe writes {o['integrity_seconds']:.3f} s of {o['wall_seconds']:.1f} s wall "
                f"({100 * o['fraction_of_wall']:.2f}%; {100 * o['fraction_of_pipeline']:.2f}% of the pipeline); "
                f"+ composed-budget accounting {o['budget_composition_seconds']:.3f} s "
                f"({100 * o['with_budget_fraction_of_wall']:.2f}% in all)",
            )
        )
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])  # fmt: skip


def main() -> None:
    parser = RefusingParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=PARTS, action="append")
    parser.add_argument("--out", type=output_file)
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    result = {"benchmark": "integrity", "device": "cpu (2 cores, shared with other jobs: timings are not benchmarks)"}
    with tempfile.TemporaryDirectory(prefix="aisec-integrity-") as tmp:
        work = Path(tmp)
        os.environ.update(AISEC_TRAIN_KEY_FILE=str(work / "keys" / "hmac.key"),
                          AISEC_TRAIN_ANCHOR_DIR=str(work / "keys" / "anchors"),
                          AISEC_TRAIN_LEDGER_STORE=str(work / "fuzz_store"),
                          AISEC_TRAIN_REGISTRY=str(work / "fuzz_registry.json"))  # fmt: skip
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        for part in args.only or PARTS:
            started = time.perf_counter()
            result[part] = globals()[part](work, size)
            result[part]["figure_seconds"] = round(time.perf_counter() - started, 1)
            result[part]["quick"] = args.quick  # parts may come from runs of different sizes (--only)
            print(f"{part}: {result[part]['figure_seconds']} s", file=sys.stderr, flush=True)
    out = args.out or (REPO / "benchmarks" / "results" / "cpu" / "integrity.json")
    if out.exists() and args.only:  # a partial run keeps the other parts' figures
        result = {**json.loads(out.read_text()), **result}
    write("integrity", result, out)
    print(table(result))


if __name__ == "__main__":
    main()

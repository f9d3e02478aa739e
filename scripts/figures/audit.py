"""Issue 6's figures, measured with the real ``aisec-train`` and ``aisec-train-monitor`` command lines.

1. The default run (``aisec-train``, seed 0) carries the membership and extraction audits and a checklist entry
   with evidence for every area; its audit stage's wall time is recorded.
2. Membership inference, per seed: ``aisec-train train.seed=S`` (DP-SGD, epsilon 3) against
   ``aisec-train privacy=none train.seed=S``. Same pipeline, same split and the same 180 + 180 targets (both
   are chosen by the seed); the paired AUC difference is reported per seed with its mean and spread.
3. Extraction: against each seed-0 model (loaded after hash verification), the attacker's plan is answered under
   three output policies (full probabilities, top-3 rounded to 2 decimals, label only) and cut at several query
   counts, for several attacker seeds. At equal queries the policy's effect is a paired difference; the budget's
   effect is the drop from the full plan to the cut.
4. Monitoring: ``aisec-train-monitor`` on three clean held-out batches and on noise / rotation / occlusion.

Writes ``benchmarks/results/cpu/audit.json`` and a markdown table. Runs are kept in ``--workdir`` (skipped when
their report.json exists), registered in a registry of their own there.

    .venv/bin/python scripts/figures/audit.py [--seeds 0 1 2] [--jobs 2] [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import REPO, own_stores, write
from scipy import ndimage
from scipy.stats import binomtest, ttest_rel

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

AREAS = ("data pipeline", "training", "model", "deployment", "monitoring")


def cli(args: list[str], run_dir: Path, threads: int) -> tuple[dict, float | None]:
    """``aisec-train ARGS hydra.run.dir=RUN_DIR`` unless that run already finished; (report, wall seconds)."""
    if (run_dir / "report.json").exists():
        return json.loads((run_dir / "report.json").read_text()), None
    # Seeds run concurrently (--jobs): each its own dataset ledger, or they would contend and compose budgets.
    env = {**own_stores(run_dir, always=True), "OMP_NUM_THREADS": str(threads)}
    env["AISEC_TRAIN_REGISTRY"] = str(run_dir.parent / "registry.json")  # keep the project's inventory clean
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "aisec_train", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"aisec-train {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "report.json").read_text()), time.perf_counter() - started


def stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "values": [float(v) for v in arr],
    }


def default_run(report: dict, seconds: float | None) -> dict:
    areas = {c["area"] for c in report["checklist"] if c["evidence"]}
    return {
        "has_membership": report["audit"]["membership"] is not None,
        "has_extraction": report["audit"]["extraction"] is not None,
        "areas_with_evidence": sorted(areas),
        "holds": areas == set(AREAS) and bool(report["audit"]["membership"]) and bool(report["audit"]["extraction"]),
        "wall_seconds": seconds,
        "stage_seconds": report["run"]["timings"],
    }


def membership_rows(pairs: dict[int, tuple[dict, dict]]) -> dict:
    rows, gaps = [], []
    for seed, (dp, plain) in sorted(pairs.items()):
        a, b = plain["audit"]["membership"], dp["audit"]["membership"]
        gaps.append(a["auc"] - b["auc"])
        for name, r in (("privacy=none", plain), ("dp eps<=3", dp)):
            m = r["audit"]["membership"]
            rows.append(
                {
                    "seed": seed,
                    "model": name,
                    "epsilon": r["privacy"]["epsilon"],
                    "clean_accuracy": r["metrics"]["clean_accuracy"],
                    "auc": m["auc"],
                    "auc_ci95": m["auc_ci95"],
                    "auc_by_attack": {k: v["auc"] for k, v in m["attacks"].items()},
                    "tpr_at_fpr_0_001": m["tpr_at_fpr_0_001"],
                    "tpr_at_fpr_0_01": m["tpr_at_fpr_0_01"],
                }
            )
    plain_auc = [r["auc"] for r in rows if r["model"] == "privacy=none"]
    dp_auc = [r["auc"] for r in rows if r["model"] != "privacy=none"]
    return {
        "rows": rows,
        "auc_gap": stats(gaps),
        # one-sided: is the non-private AUC higher? (paired over seeds: same split, same targets)
        "paired_t_test_p": float(ttest_rel(plain_auc, dp_auc, alternative="greater").pvalue) if len(gaps) > 1 else None,
        "sign_test_p": float(binomtest(sum(g > 0 for g in gaps), len(gaps), 0.5, alternative="greater").pvalue),
        "holds": all(g > 0 for g in gaps),
        "seeds": sorted(pairs),
    }


def extraction_sweep(run_dir: Path, counts: list[int], seeds: list[int], epochs: int) -> dict:
    """Fidelity per (output policy, queries answered), paired over attacker seeds, against one run's model.

    Cached beside the run (``extraction_sweep.json``) for the same model, counts, seeds and epochs.
    """
    cache = run_dir / "extraction_sweep.json"
    key = {"model_sha256": (run_dir / "model.pt.sha256").read_text().split()[0], "counts": counts}
    key.update(seeds=seeds, epochs=epochs)
    if cache.exists() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())["result"]
    result = _sweep(run_dir, counts, seeds, epochs)
    cache.write_text(json.dumps({"key": key, "result": result}))
    return result


def _sweep(run_dir: Path, counts: list[int], seeds: list[int], epochs: int) -> dict:
    import torch

    from aisec_train.audit import extraction, monitor
    from aisec_train.audit.config import GuardConfig, OutputPolicy
    from aisec_train.audit.guard import Guard
    from aisec_train.data.config import DatasetConfig
    from aisec_train.data.dataset import load_dataset

    torch.set_num_threads(1)
    _, model = monitor.load_run(run_dir)  # hash-verified, weights_only
    factory = factory_of(json.loads((run_dir / "report.json").read_text()))
    data = load_dataset(DatasetConfig(), seed=0)
    attacker_x, evaluation = extraction.split_heldout(data.test, seed=0)
    policies = {
        "probs": GuardConfig(output=OutputPolicy.probs, query_budget=0),
        "top3_rounded2": GuardConfig(output=OutputPolicy.top_k, top_k=3, round_decimals=2, query_budget=0),
        "label": GuardConfig(output=OutputPolicy.label, query_budget=0),
    }
    fid: dict[str, dict[int, list[float]]] = {p: {n: [] for n in counts} for p in policies}
    for seed in seeds:
        plan = extraction.attacker_queries(attacker_x, max(counts), seed)
        for name, cfg in policies.items():
            for n in counts:  # the same plan, cut at n: what a budget of n leaves the attacker
                guard = Guard(model, input_shape=tuple(plan.shape[1:]), cfg=cfg, seed=seed)
                r = extraction.run_extraction(
                    guard, plan[:n], model, evaluation, factory=factory, epochs=epochs, seed=seed
                )
                fid[name][n].append(r["fidelity"])
    table = {p: {n: stats(v) for n, v in by_n.items()} for p, by_n in fid.items()}
    full = max(counts)
    label_gap = {n: stats(np.subtract(fid["probs"][n], fid["label"][n]).tolist()) for n in counts}
    budget_gap = {n: stats(np.subtract(fid["probs"][full], fid["probs"][n]).tolist()) for n in counts if n < full}
    return {"fidelity": table, "label_vs_probs_at_equal_queries": label_gap, "budget_vs_full_plan": budget_gap}


def factory_of(report: dict):
    """The surrogate's model factory, rebuilt from what the run's report says about its model and data."""
    from aisec_train.models import ModelFactory

    model, norm = report["model"], report["model"].get("input_normalization")
    return ModelFactory(
        {"_target_": model["target"], **model.get("arguments", {})},
        input_shape=tuple(report["data"]["shape"]),
        num_classes=report["data"]["num_classes"],
        private=report["privacy"].get("mode") == "dpsgd",
        normalize=(norm["mean"], norm["std"]) if norm else None,
    )


def monitor_verdicts(run_dir: Path, workdir: Path) -> dict:
    from aisec_train.data.config import DatasetConfig
    from aisec_train.data.dataset import load_dataset
    from aisec_train.data.views import materialize

    x = materialize(load_dataset(DatasetConfig(), seed=0).test)[0][1::2, 0].numpy()  # unseen by the baseline
    occluded = x[:60].copy()
    occluded[:, 2:6, 2:6] = 1.0
    rng = np.random.default_rng(0)
    batches = {f"clean_{i}": part for i, part in enumerate(np.array_split(x, 3))}
    batches["noise"] = np.clip(x[:60] + rng.normal(0, 0.2, (60, 8, 8)), 0, 1).astype(np.float32)
    batches["rotation"] = np.clip(ndimage.rotate(x[:60], 30, axes=(1, 2), reshape=False, order=1), 0, 1)
    batches["occlusion"] = occluded
    script = Path(sys.executable).with_name("aisec-train-monitor")
    out = {}
    for name, batch in batches.items():
        path = workdir / f"monitor_{name}.npz"
        np.savez(path, x=batch.astype(np.float32))
        proc = subprocess.run([script, run_dir, path], capture_output=True, text=True)
        out[name] = {"exit": proc.returncode, "verdict": proc.stdout.splitlines()[0] if proc.stdout else proc.stderr}
    ok = all((v["exit"] == 0) == name.startswith("clean") and v["exit"] in (0, 1) for name, v in out.items())
    return {"batches": out, "holds": ok, "random_clean_batches": _false_alarms(run_dir, x)}


def _false_alarms(run_dir: Path, x: np.ndarray, draws: int = 200) -> dict:
    """The monitor's check (what the command runs) on random clean held-out batches: alarms and the worst score."""
    import torch

    from aisec_train.audit import monitor

    baseline, model = monitor.load_run(run_dir)
    rng = np.random.default_rng(0)
    out = {}
    for n in (20, 50, 90):
        verdicts = [
            monitor.check(baseline, model, torch.from_numpy(x[rng.choice(len(x), n, replace=False)][:, None]))
            for _ in range(draws)
        ]
        out[n] = {
            "draws": draws,
            "alarms": sum(v.alarm for v in verdicts),
            "max_drift_score": max(v.drift_score for v in verdicts),
            "min_confidence_z": min(v.confidence_z for v in verdicts),
        }
    return out


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(result: dict) -> str:
    d, m, e = result["default_run"], result["membership"], result["extraction"]
    lines = [
        "| figure | measured | holds |",
        "|---|---|---|",
        "| default run: membership + extraction audits, evidence in every area | areas "
        f"{', '.join(d['areas_with_evidence'])}; audit stage {d['stage_seconds'].get('audit')} s | {d['holds']} |",
        f"| membership AUC: privacy=none > eps<=3 (seeds {m['seeds']}) | paired gap {m['auc_gap']['mean']:.3f} ± "
        f"{m['auc_gap']['std']:.3f}, per seed {[round(v, 3) for v in m['auc_gap']['values']]}; one-sided paired t-test "
        f"p {_p(m['paired_t_test_p'])}, sign test p {_p(m['sign_test_p'])} | {m['holds']} |",
    ]
    for victim, sweep in e.items():
        for n, gap in sweep["label_vs_probs_at_equal_queries"].items():
            lines.append(
                f"| extraction ({victim}): label-only vs full probs at {n} queries | fidelity drop {gap['mean']:.3f} ± "
                f"{gap['std']:.3f} | {gap['mean'] > 0 and all(v > 0 for v in gap['values'])} |"
            )
        for n, gap in sweep["budget_vs_full_plan"].items():
            lines.append(
                f"| extraction ({victim}): budget {n} vs {max(map(int, sweep['fidelity']['probs']))} queries "
                f"(full probs) | fidelity drop {gap['mean']:.3f} ± {gap['std']:.3f} | "
                f"{all(v > 0 for v in gap['values'])} |"
            )
    mon = result["monitor"]
    verdicts = ", ".join(f"{k}: exit {v['exit']}" for k, v in mon["batches"].items())
    lines.append(f"| monitor flags every shifted batch, no clean one | {verdicts} | {mon['holds']} |")
    for n, r in mon["random_clean_batches"].items():
        lines.append(
            f"| monitor: {r['draws']} random clean batches of {n} | {r['alarms']} alarm(s), max drift score "
            f"{r['max_drift_score']:.2f}, min confidence z {r['min_confidence_z']:+.2f} | {r['alarms'] == 0} |"
        )
    lines += [
        "",
        "| seed | model | epsilon | clean acc | MIA AUC (95% CI) | TPR@0.1% | TPR@1% |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in m["rows"]:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lo, hi = r["auc_ci95"]
        lines.append(
            f"| {r['seed']} | {r['model']} | {eps} | {r['clean_accuracy']:.3f} | {r['auc']:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{r['tpr_at_fpr_0_001']:.3f} | {r['tpr_at_fpr_0_01']:.3f} |"
        )
    for victim, sweep in e.items():
        counts = list(sweep["fidelity"]["probs"])
        lines += ["", f"Extraction fidelity against the {victim} model (mean ± std over attacker seeds):", ""]
        lines += ["| policy | " + " | ".join(f"{n} queries" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
        for policy, by_n in sweep["fidelity"].items():
            cells = " | ".join(f"{s['mean']:.3f} ± {s['std']:.3f}" for s in by_n.values())
            lines.append(f"| {policy} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--attacker-seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1, help="CLI runs at a time (threads are split between them)")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "figures" / "audit")
    parser.add_argument(
        "--quick", action="store_true", help="experiment=smoke, one seed: checks the script, not the claims"
    )
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    extra = ["experiment=smoke"] if args.quick else []
    args.workdir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = {
        (s, p): (extra + ([] if p == "dp" else ["privacy=none"]) + ([f"train.seed={s}"] if s else []))
        for s in seeds
        for p in ("dp", "none")
    }
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {k: pool.submit(cli, a, args.workdir / f"{k[1]}-seed{k[0]}", threads) for k, a in jobs.items()}
        runs = {k: f.result() for k, f in futures.items()}
    counts = [50, 150] if args.quick else [50, 100, 150, 300, 500]
    attacker_seeds = list(range(2 if args.quick else args.attacker_seeds))
    epochs = 30
    result = {
        "benchmark": "audit",
        "device": f"cpu ({os.cpu_count()} cores, shared with other jobs: timings are not benchmarks)",
        "quick": args.quick,
        "default_run": default_run(*runs[(seeds[0], "dp")]),
        "membership": membership_rows({s: (runs[(s, "dp")][0], runs[(s, "none")][0]) for s in seeds}),
        "extraction": {
            name: extraction_sweep(args.workdir / f"{p}-seed{seeds[0]}", counts, attacker_seeds, epochs)
            for name, p in (("dp eps<=3", "dp"), ("privacy=none", "none"))
        },
        "monitor": monitor_verdicts(args.workdir / f"dp-seed{seeds[0]}", args.workdir),
    }
    result["rows"] = [
        {
            "impl": f"{p}-seed{s}",
            # stage seconds from the run's own report (the process's wall time only when this invocation ran it)
            "seconds": round(sum(runs[(s, p)][0]["run"]["timings"].values()), 1),
            "wall_seconds": runs[(s, p)][1],
            "audit_seconds": runs[(s, p)][0]["run"]["timings"]["audit"],
        }
        for s, p in jobs
    ]
    result["ratios"] = {}
    path = write("audit", result, args.out) if not args.quick or args.out else None
    print(markdown(result))
    if path:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Issue 12's robustness figures: how much PGD-20 over-reports, our AutoAttack against torchattacks', TRADES
against PGD-AT, and what the default evaluation suite costs the default job.

1. **Suites on the same models and samples.** Per seed, the pipeline trains five models on digits (Python API,
   ``audit=off``, ``robustness.eval=pgd`` so the report carries PGD-20's figure): the default job (DP-SGD,
   epsilon 3, ``robustness=none``), ``robustness=pgd_at`` and ``robustness=trades`` (non-private), and both again
   with DP at epsilon 8 (``privacy.grad_sample_mode=bk``, the default, or ``--trades-dp-mode hooks`` for TRADES:
   ghost clipping cannot clip its two forward passes). Each model is loaded back from its run directory
   (``model.pt``, verified, through the model factory: ``aisec_train.audit.monitor.load_run``) and evaluated by
   ``evaluate_robustness`` with each suite,
   ``pgd`` (PGD-20, 2 restarts), ``apgd`` (APGD-CE + APGD-T, the report's default, masking checks on) and
   ``autoattack`` (the standard ensemble), on the same held-out samples with the same seed. Our ``pgd`` figure
   must equal the report's (a check that the reloaded model is the released one). The gap ``pgd - autoattack``
   is how much PGD-20 over-reported.
2. **Ours vs torchattacks' AutoAttack** on the seed-0 default, pgd_at and trades models, same samples:
   ``benchmarks/autoattack.py``'s :func:`compare` (both the standard cascade at the same budget).
3. **TRADES vs PGD-AT**, 3 seeds: clean and AutoAttack robust accuracy, non-private and with DP at epsilon 8
   (the same runs as 1).
4. **The default job's wall time**, ``robustness.eval=apgd`` (the default) against ``robustness.eval=pgd``:
   the real ``aisec-train`` command, same seeds, interleaved (the order alternates per seed). Goal: at most +25%.
   From each report: ``run.timings.robustness`` and the suite's own seconds per attack and per masking check,
   with the nominal gradient evaluations that explain them.

Every DP run spends on its own ledger store (``privacy.ledger_store`` in the run's temporary folder), and runs
register in a throwaway registry: the figure never charges the project's digits budget.

    .venv/bin/python scripts/figures/robust_eval.py [--seeds 0 1 2] [--quick] [--trades-dp-mode hooks|bk] [--out FILE]

Writes ``benchmarks/results/cpu/robust_eval.json`` (``--quick``: ``benchmarks/results/cpu-quick/``) and
markdown tables on stdout. Each finished model (with its torchattacks comparison) and each default-job run is also
appended to ``robust_eval.progress.jsonl`` beside it (``common.Progress``); a re-run keeps those instead of measuring
them again, so the figure can be measured across sittings (``"seconds"`` then counts only the last one). Time each
sitting on an otherwise idle machine: the AutoAttack and default-job timings are wall-clock figures.
``--quick`` (2 epochs, 60 samples, 10-step AutoAttack, smoke default job) checks the
script, not the claims.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import REPO, RESULTS, Progress, run_cli, write

import aisec_train
from aisec_train.audit.monitor import load_run
from aisec_train.data.dataset import load_dataset
from aisec_train.data.views import materialize
from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file
from aisec_train.robust.evaluation import evaluate_robustness

TRADES_DP_MODE = "bk"  # the default; clips the sum of TRADES' two per-sample contributions, as hooks does
CASES: dict[str, list[str]] = {
    "default_dp": [],  # aisec-train's default job: DP-SGD at epsilon 3, robustness=none
    "pgd_at": ["privacy=none", "robustness=pgd_at"],
    "trades": ["privacy=none", "robustness=trades"],
    "pgd_at_dp8": ["privacy.target_epsilon=8", "robustness=pgd_at"],
    "trades_dp8": ["privacy.target_epsilon=8", "robustness=trades", f"privacy.grad_sample_mode={TRADES_DP_MODE}"],
}
SUITES = ("pgd", "apgd", "autoattack")
COMPARED = ("default_dp", "pgd_at", "trades")  # the models of the torchattacks comparison (seed 0)
GOAL = 1.25  # the default job with robustness.eval=apgd may take at most 25% longer than with pgd


def _bench():
    """benchmarks/autoattack.py as a module (its folder is not a package; its ``common`` is not ours)."""
    spec = importlib.util.spec_from_file_location("autoattack_bench", REPO / "benchmarks" / "autoattack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def isolate(tmp: Path) -> None:
    """Key, anchors and registry of this figure's runs in its own folder (nothing lands in ~/.config)."""
    os.environ.setdefault("AISEC_TRAIN_KEY_FILE", str(tmp / "hmac.key"))
    os.environ.setdefault("AISEC_TRAIN_ANCHOR_DIR", str(tmp / "anchors"))
    os.environ.setdefault("AISEC_TRAIN_REGISTRY", str(tmp / "registry.json"))


def own_ledger(tmp: Path, name: str) -> str:
    return f"privacy.ledger_store={tmp / f'ledger-{name}'}"


def train_case(case: str, seed: int, tmp: Path, quick: bool, samples: int) -> tuple[list[str], Path, dict]:
    """One pipeline run of ``case``; its overrides, run directory and report."""
    name = f"{case}-{seed}"
    overrides = [*CASES[case], f"train.seed={seed}", "audit=off", "robustness.eval=pgd"]
    overrides += [f"robustness.eval_samples={samples}", own_ledger(tmp, name)]
    overrides += ["train.epochs=2"] if quick else []
    started = time.perf_counter()
    aisec_train.run(aisec_train.compose(overrides), run_dir=tmp / name)
    report = _read(tmp / name)
    report["_seconds"] = time.perf_counter() - started
    return overrides, tmp / name, report


def _read(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def held_out(overrides: list[str], samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples the pipeline's robustness stage evaluated: the first ``samples`` of the held-out split."""
    cfg = aisec_train.compose(overrides)
    data = load_dataset(cfg.dataset, seed=cfg.train.seed)
    return materialize(data.test, limit=samples or len(data.test))


def evaluate_suites(model, x, y, eps: float, seed: int, quick: bool) -> dict[str, dict]:
    budgets: dict[str, dict] = {s: {} for s in SUITES}
    if quick:
        budgets["autoattack"] = dict(steps=10, square_queries=300)
    out = {}
    for suite in SUITES:
        r = evaluate_robustness(model, x, y, suite=suite, norm="linf", eps=eps, seed=seed, **budgets[suite])
        out[suite] = {
            "robust_accuracy": r["robust_accuracy"],
            "clean_accuracy": r["clean_accuracy"],
            "seconds": r["seconds"],
            "attacks": {
                k: {"robust_accuracy": v.get("robust_accuracy"), "seconds": v.get("seconds")}
                for k, v in r["attacks"].items()
            },
            "masking_flagged": r["gradient_masking"]["flagged"],
            "masking_reasons": r["gradient_masking"]["reasons"],
            "budget": r["attack"],
        }
    return out


def model_rows(
    seeds: list[int], tmp: Path, quick: bool, samples: int, compare_budget, progress: Progress
) -> tuple[list, list]:
    bench = _bench()
    rows, versus = [], []
    for seed in seeds:
        for case in CASES:
            kept = progress.get(f"model {case} {seed}")
            if kept is not None:
                rows.append(kept["row"])
                versus += kept["versus"]
                continue
            overrides, run_dir, report = train_case(case, seed, tmp, quick, samples)
            _, model = load_run(run_dir)
            x, y = held_out(overrides, samples)
            eps = report["robustness"]["attack"]["eps"]
            suites = evaluate_suites(model, x, y, eps, seed, quick)
            pipeline_pgd = report["robustness"]["robust_accuracy"]
            rows.append(
                {
                    "case": case,
                    "seed": seed,
                    "overrides": overrides[: len(CASES[case])],
                    "epsilon": report["privacy"]["epsilon"],
                    "clean_accuracy": report["metrics"]["clean_accuracy"],
                    "eps": eps,
                    "n_samples": len(x),
                    "suites": suites,
                    "gap_pgd_minus_autoattack": suites["pgd"]["robust_accuracy"]
                    - suites["autoattack"]["robust_accuracy"],
                    "gap_apgd_minus_autoattack": suites["apgd"]["robust_accuracy"]
                    - suites["autoattack"]["robust_accuracy"],
                    "pipeline_pgd_robust_accuracy": pipeline_pgd,
                    "reloaded_model_matches_report": abs(suites["pgd"]["robust_accuracy"] - pipeline_pgd) < 1e-9,
                    "train_seconds": report["run"]["timings"]["train"],
                    "run_seconds": report["_seconds"],
                }
            )
            print(f"seed {seed} {case}: " + _brief(rows[-1]), file=sys.stderr)
            compared = []
            if seed == seeds[0] and case in COMPARED:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # as benchmarks/autoattack.py: tiny ops, extra threads only synchronise
                try:
                    compared = bench.compare(
                        model, x, y, eps, budgets=[compare_budget], name=case, reference_suites=False
                    )
                finally:
                    torch.set_num_threads(threads)
            versus += compared
            progress.add(f"model {case} {seed}", {"row": rows[-1], "versus": compared})
    return rows, versus


def _brief(row: dict) -> str:
    figures = " ".join(f"{s} {row['suites'][s]['robust_accuracy']:.3f}" for s in SUITES)
    return f"clean {row['clean_accuracy']:.3f} {figures} (report pgd {row['pipeline_pgd_robust_accuracy']:.3f})"


def nominal_gradients(ev: dict) -> dict[str, float]:
    """Forward+backward passes per evaluated sample that the report's suite implies (Square: forwards only)."""
    n = ev["n_samples"]
    correct = ev["clean_accuracy"] * n
    checks = ev["gradient_masking"]["checks"]
    if ev["suite"] == "pgd":
        pgd = ev["pgd"]
        return {  # the pgd suite attacks every sample (early stop aside), its steps check too
            "pgd": pgd["steps"] * pgd["restarts"],
            "steps_check": checks["steps"]["steps"][0] * pgd["restarts"],
            "zero_gradient_check": correct / n,
        }
    ce, t = ev["apgd-ce"], ev.get("apgd-t", {})
    after_ce = ce["robust_accuracy"] * n
    after_t = t.get("robust_accuracy", ce["robust_accuracy"]) * n
    return {
        "apgd-ce": ce["steps"] * ce["restarts"] * correct / n,
        "apgd-t": t.get("steps", 0) * t.get("n_target_classes", 0) * after_ce / n,
        "steps_check": checks["steps"]["steps"][0] * correct / n,
        "square_check_forwards": checks.get("square", {}).get("queries", 0) * after_t / n,
        "zero_gradient_check": correct / n,
    }


def stage_costs(report: dict) -> dict[str, Any]:
    """Seconds of the robustness stage, the suite, each attack and each masking check, from report.json."""
    ev = report["robustness"]["eval"]
    attacks = {
        k: v["seconds"] for k, v in ev.items() if isinstance(v, dict) and "seconds" in v and k != "gradient_masking"
    }
    checks = {k: v["seconds"] for k, v in ev["gradient_masking"]["checks"].items() if "seconds" in v}
    return {
        "robustness_stage": report["run"]["timings"]["robustness"],
        "suite_seconds": ev["seconds"],
        "attacks": attacks,
        "masking_checks": checks,
        "other": ev["seconds"] - sum(attacks.values()) - sum(checks.values()),  # zero-gradient check, predictions
        "nominal_gradients_per_sample": nominal_gradients(ev),
        "robust_accuracy": ev["robust_accuracy"],
    }


def default_job(seeds: list[int], tmp: Path, quick: bool, progress: Progress) -> dict:
    """``aisec-train robustness.eval=apgd`` vs ``=pgd``, same seeds, interleaved; whole-process wall time."""
    rows = []
    for i, seed in enumerate(seeds):
        for suite in ("apgd", "pgd") if i % 2 == 0 else ("pgd", "apgd"):
            name = f"job-{suite}-{seed}"
            kept = progress.get(name)
            if kept is not None:
                rows.append(kept)
                continue
            args = [f"train.seed={seed}", f"robustness.eval={suite}", own_ledger(tmp, name)]
            args += ["experiment=smoke", "audit=off"] if quick else []
            report, seconds = run_cli(args, tmp / name)
            rows.append(progress.add(name, {"suite": suite, "seed": seed, "seconds": seconds, **stage_costs(report)}))
            print(f"default job {suite} seed {seed}: {seconds:.1f} s", file=sys.stderr)

    def mean(suite: str, key: str) -> float:
        return statistics.mean(r[key] for r in rows if r["suite"] == suite)

    ratio = mean("apgd", "seconds") / mean("pgd", "seconds")
    extra = mean("apgd", "robustness_stage") - mean("pgd", "robustness_stage")
    return {
        "command": "aisec-train train.seed=S robustness.eval={apgd,pgd}"
        + (" experiment=smoke audit=off" if quick else ""),
        "rows": rows,
        "apgd_over_pgd_seconds": ratio,
        "robustness_stage_extra_seconds": extra,
        "robustness_stage_share_apgd": mean("apgd", "robustness_stage") / mean("apgd", "seconds"),
        "goal": f"apgd job <= {GOAL:.2f} x pgd job",
        "met": ratio <= GOAL,
        "excess_over_goal_seconds": max(0.0, mean("apgd", "seconds") - GOAL * mean("pgd", "seconds")),
    }


def _ms(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(rows: list[dict], versus: list[dict]) -> dict:
    out: dict[str, Any] = {"cases": {}, "torchattacks": {}}
    for case in CASES:
        rs = [r for r in rows if r["case"] == case]
        out["cases"][case] = {
            "seeds": len(rs),
            "clean_accuracy": [r["clean_accuracy"] for r in rs],
            **{f"{s}_robust_accuracy": [r["suites"][s]["robust_accuracy"] for r in rs] for s in SUITES},
            "gap_pgd_minus_autoattack": [r["gap_pgd_minus_autoattack"] for r in rs],
            "masking_flagged": {s: sum(r["suites"][s]["masking_flagged"] for r in rs) for s in SUITES},
            "epsilon": rs[0]["epsilon"],
        }
    for case in COMPARED:
        pair = {r["impl"]: r for r in versus if r["model"] == case}
        if "ours" in pair:
            ours, theirs = pair["ours"], pair["torchattacks"]
            out["torchattacks"][case] = {
                "ours_minus_torchattacks_points": 100 * (ours["robust_accuracy"] - theirs["robust_accuracy"]),
                "ours_vs_torchattacks": theirs["seconds"] / ours["seconds"],  # above 1: ours is faster
                "within_half_point": ours["robust_accuracy"] <= theirs["robust_accuracy"] + 0.005,
            }
    out["reloaded_models_match_reports"] = all(r["reloaded_model_matches_report"] for r in rows)
    return out


def tables(result: dict) -> str:
    cases, lines = result["summary"]["cases"], []
    lines += ["### Robust accuracy by suite (same samples; mean ± std over seeds)", ""]
    lines += [
        "| model | epsilon | clean | PGD-20 | APGD (default) | AutoAttack | PGD-20 over-reports by (points) | "
        "masking flagged (pgd/apgd/autoattack) |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for case, c in cases.items():
        eps = "-" if c["epsilon"] is None else f"{c['epsilon']:.2f}"
        gap = [100 * g for g in c["gap_pgd_minus_autoattack"]]
        lines.append(
            f"| {case} | {eps} | {_ms(c['clean_accuracy'])} | {_ms(c['pgd_robust_accuracy'])} | "
            f"{_ms(c['apgd_robust_accuracy'])} | {_ms(c['autoattack_robust_accuracy'])} | {_ms(gap, 1)} | "
            f"{'/'.join(str(c['masking_flagged'][s]) for s in SUITES)} of {c['seeds']} |"
        )
    lines += ["", "### Our AutoAttack vs torchattacks' (seed 0, same model, samples and budget)", ""]
    lines += ["| model | budget | ours robust | torchattacks robust | ours - theirs (points) | ours s | theirs s |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for case in COMPARED:
        pair = {r["impl"]: r for r in result["torchattacks"] if r["model"] == case}
        if "ours" in pair:
            o, t = pair["ours"], pair["torchattacks"]
            diff = 100 * (o["robust_accuracy"] - t["robust_accuracy"])
            lines.append(
                f"| {case} | {o['budget']} | {o['robust_accuracy']:.3f} | {t['robust_accuracy']:.3f} | {diff:+.1f} | "
                f"{o['seconds']:.1f} | {t['seconds']:.1f} |"
            )
    job = result["default_job"]
    lines += ["", f"### Default job: robustness.eval=apgd vs pgd ({job['command']})", ""]
    lines += ["| suite | seed | job s | robustness stage s | suite s | per attack s | masking checks s |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in job["rows"]:
        attacks = ", ".join(f"{k} {v:.1f}" for k, v in r["attacks"].items())
        checks = ", ".join(f"{k} {v:.1f}" for k, v in r["masking_checks"].items())
        lines.append(
            f"| {r['suite']} | {r['seed']} | {r['seconds']:.1f} | {r['robustness_stage']:.1f} | "
            f"{r['suite_seconds']:.1f} | {attacks} | {checks} |"
        )
    lines.append(
        f"\napgd job / pgd job: {job['apgd_over_pgd_seconds']:.3f} (goal <= {GOAL}; met: {job['met']}); robustness "
        f"stage +{job['robustness_stage_extra_seconds']:.1f} s; nominal gradient passes per sample: "
        + "; ".join(
            f"{r['suite']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["nominal_gradients_per_sample"].items())
            for r in job["rows"][:2]
        )
    )
    return "\n".join(lines)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 60 samples, 10-step AutoAttack")
    parser.add_argument("--out", type=output_file, default=None)
    parser.add_argument("--trades-dp-mode", choices=["hooks", "bk"], default=TRADES_DP_MODE, help="grad_sample_mode")
    args = parser.parse_args()
    CASES["trades_dp8"][-1] = f"privacy.grad_sample_mode={args.trades_dp_mode}"
    bench = _bench()
    seeds = args.seeds[:1] if args.quick else args.seeds
    samples = 60 if args.quick else 0  # 0: the whole held-out split (digits: 360)
    budget = bench.QUICK_BUDGET if args.quick else bench.STANDARD_BUDGET
    out = args.out or (RESULTS.parent / "cpu-quick" if args.quick else RESULTS) / "robust_eval.json"
    progress = Progress(out, quick=args.quick, samples=samples, trades_dp_mode=args.trades_dp_mode)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="robust_eval-") as folder:
        tmp = Path(folder)
        isolate(tmp)
        rows, versus = model_rows(seeds, tmp, args.quick, samples, budget, progress)
        job = default_job(seeds, tmp, args.quick, progress)
    result = {
        "figure": "robust_eval",
        "device": "cpu",
        "quick": args.quick,
        "seeds": seeds,
        "cases": CASES,
        "rows": rows,
        "torchattacks": versus,
        "default_job": job,
        "seconds": time.perf_counter() - started,
    }
    result["summary"] = summarise(rows, versus)
    print(tables(result))
    path = write("robust_eval", result, out)
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

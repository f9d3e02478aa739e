"""Issue 12's privacy-evaluation figures, measured through the pipeline (the Python API, in this process).

1. **Membership inference** (report.json ``audit.membership.attacks``): per seed, the default job (DP-SGD,
   epsilon 3) and the same job with ``privacy=none``; the loss attack, offline LiRA and offline RMIA, all from the
   same two OUT reference models. AUC and TPR at 0.1% / 1% FPR with their 95% bootstrap intervals, and the
   strongest attack (the report's headline). On digits every held-out sample is a target (360 + 360), so the
   FPR resolution is 1/360: "TPR at 0.1% FPR" is the TPR at zero false positives.
2. **One-run privacy audit** (``audit.privacy_audit=on audit.canaries.m=500``, mislabelled canaries; report
   ``audit.privacy_audit``): the epsilon lower bound of the non-private default model and of the default model at
   epsilon 1, 3 and 8, beside the claimed ``privacy.epsilon``; the checklist verdict; the audit's own seconds
   against the training stage's (its extra wall time: one more training of the same recipe).
3. **The broken-DP drill**: the recipe of ``tests/test_privacy_audit_drill.py`` (an MLP that memorises, claim
   epsilon 1) with the private step's noise scaled to 0 from this script (:func:`noise_scale`; no noise while the
   ledger charges epsilon 1), and the same recipe with honest noise as the control.
4. **Independent check**: opake-auditing's one-run estimate on the same canary scores and coins. The pipeline
   does not keep the scores, so this script wraps ``privacy_audit.run_privacy_audit`` to ask for them
   (``keep_scores=True``) and drops them from what the pipeline reports: the report is unchanged.

Every DP run spends on its own ledger store (``privacy.ledger_store`` in this script's temporary folder); runs
register in a throwaway registry. Nothing is charged to the project's digits budget.

    .venv/bin/python scripts/figures/privacy_eval.py [--seeds 0 1 2 3 4] [--quick] [--out FILE]

Writes ``benchmarks/results/cpu/privacy_eval.json`` (``--quick``: ``benchmarks/results/cpu-quick/``) and
markdown tables. Each finished run is also appended to ``privacy_eval.progress.jsonl`` beside it, and a re-run
keeps those rows instead of measuring them again: the full figure takes hours on 2 cores, and can be measured
across several sittings (``"seconds"`` then counts only the last one; each row has its own ``run_seconds``).
``--quick`` (one seed, 3-epoch smoke jobs, 200 canaries; the drill as in its test) checks the
script, not the claims.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import opake.auditing as opake_auditing
from common import REPO, RESULTS, Progress, write
from opake.auditing.types import CoinFlip

import aisec_train
from aisec_train.audit import privacy_audit
from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

SETTINGS: dict[str, list[str]] = {
    "none": ["privacy=none"],
    "eps1": ["privacy.target_epsilon=1"],
    "eps3": [],  # the default job
    "eps8": ["privacy.target_epsilon=8"],
}
MEMBERSHIP = ("none", "eps3")  # these runs keep the membership audit (audit.enabled) on
ATTACKS = ("loss", "lira_offline", "rmia")
BROKEN_SCALE = 0.0  # the drill's noise scale: none at all, while the ledger charges the configured epsilon


def drill_recipe() -> list[str]:
    """The broken-DP drill's overrides, read from its test so that the figure and the test cannot drift apart."""
    path = REPO / "tests" / "test_privacy_audit_drill.py"
    spec = importlib.util.spec_from_file_location("privacy_audit_drill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.DRILL)


def merge(*groups: list[str]) -> list[str]:
    """Hydra overrides, a later ``key=value`` replacing an earlier one of the same key."""
    out: dict[str, str] = {}
    for group in groups:
        for item in group:
            out[item.split("=", 1)[0]] = item
    return list(out.values())


class ScoreCapture(contextlib.AbstractContextManager):
    """While active, the pipeline's one-run audit also hands its canary scores and coins to this object (and
    reports exactly what it reports without it)."""

    def __enter__(self) -> ScoreCapture:
        self.original, self.scores, self.included = privacy_audit.run_privacy_audit, None, None

        def keeping(*args: Any, **kwargs: Any) -> dict[str, Any]:
            result = self.original(*args, **{**kwargs, "keep_scores": True})
            self.scores, self.included = result.pop("scores"), result.pop("included_mask")
            return result

        privacy_audit.run_privacy_audit = keeping
        return self

    def __exit__(self, *exc: object) -> None:
        privacy_audit.run_privacy_audit = self.original


@contextlib.contextmanager
def noise_scale(scale: float | None):
    """The broken-DP drill: the private step adds ``scale`` times the noise while the ledger charges the configured
    noise. Patched from here into our grouped draw (aisec_train/privacy/noise.py, every optimizer our engine makes)
    and into Opacus' own (the optimizers that keep it), and put back afterwards."""
    import opacus.optimizers.optimizer as base
    import opacus.optimizers.optimizer_fast_gradient_clipping as fast

    from aisec_train.privacy import noise

    original, original_draw = base._generate_noise, noise._draw

    def scaled(std, reference, generator=None, secure_mode=False):
        return original(std * scale, reference, generator, secure_mode)

    def scaled_draw(std, n, device, generator, secure):
        return original_draw(std * scale, n, device, generator, secure)

    saved = [(module, "_generate_noise", module._generate_noise) for module in (base, fast)]
    saved.append((noise, "_draw", original_draw))
    if scale is not None:
        base._generate_noise = fast._generate_noise = scaled
        noise._draw = scaled_draw
    try:
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)


def opake_bound(scores: list[float], included: list[bool], delta: float) -> float:
    """opake-auditing's (eps, delta) one-run estimate on the same scores and the same coins."""
    ids, mask = np.arange(len(scores)), np.asarray(included, dtype=bool)
    coins = CoinFlip(
        num_canaries=len(ids), canary_indices=ids, _in_mask=mask, in_indices=ids[mask], out_indices=ids[~mask]
    )
    canaries = opake_auditing.canary_scores(np.asarray(scores), canary_indices=ids)
    estimate = opake_auditing.one_run(canaries, coin_flip=coins).eps_delta()
    return float(estimate.epsilon_at(delta=delta, significance=0.05))


def run_setting(setting: str, overrides: list[str], seed: int, tmp: Path, scale: float | None = None) -> dict:
    """One pipeline run with the one-run audit on; the report's figures, the checklist verdict and opake's."""
    name = f"{setting}-{seed}"
    overrides = merge(overrides, [f"train.seed={seed}", f"privacy.ledger_store={tmp / f'ledger-{name}'}"])
    started = time.perf_counter()
    with ScoreCapture() as capture, noise_scale(scale):
        aisec_train.run(aisec_train.compose(overrides), run_dir=tmp / name)
    seconds = time.perf_counter() - started
    report = json.loads((tmp / name / "report.json").read_text())
    audit, timings = report["audit"]["privacy_audit"], report["run"]["timings"]
    item = next(c for c in report["checklist"] if c["item"] == privacy_audit.ITEM)
    row = {
        "seed": seed,
        "setting": setting,
        "overrides": overrides,
        "claimed_epsilon": report["privacy"]["epsilon"],
        "noise_multiplier": report["privacy"]["noise_multiplier"],
        "noise_scale": scale,
        "clean_accuracy": report["metrics"]["clean_accuracy"],
        "privacy_audit": audit,
        "checklist": {"status": item["status"], "evidence": item["evidence"]},
        "opake_eps_delta": opake_bound(capture.scores, capture.included, audit["delta"]),
        "timings": timings,
        "audit_over_train": audit["seconds"] / timings["train"],
        "audit_stage_without_privacy_audit": timings["audit"] - audit["seconds"],
        "run_seconds": seconds,
    }
    membership = report["audit"].get("membership")
    if membership:
        row["membership"] = {
            "attacks": membership["attacks"],
            "strongest_attack": membership["strongest_attack"],
            "population_samples": membership["population_samples"],
            "population_heldout": membership["population_heldout"],
            "reference_models": membership["reference_models"],
        }
    print(f"{name}: bound {audit['epsilon_lower_bound']:.3f} claim {row['claimed_epsilon']} "
          f"{item['status']} ({seconds:.0f} s)", file=sys.stderr)  # fmt: skip
    return row


def runs_for_seed(seed: int, quick: bool, m: int) -> list[tuple[str, list[str], float | None]]:
    """(setting, overrides, drill noise scale) of every run one seed takes."""
    base = ["audit.privacy_audit=on", f"audit.canaries.m={m}", "robustness.evaluate=false"]
    base += ["experiment=smoke"] if quick else []
    runs = []
    for setting, overrides in SETTINGS.items():
        audit = [] if setting in MEMBERSHIP else ["audit.enabled=false"]
        runs.append((setting, merge(base, overrides, audit), None))
    drill = drill_recipe()  # exactly the test's recipe (its 500 canaries, 100 epochs: an MLP, cheap), even --quick
    runs.append(("drill_honest", drill, None))
    runs.append(("drill_broken", drill, BROKEN_SCALE))
    return runs


def measure(seeds: list[int], quick: bool, m: int, tmp: Path, out: Path) -> list[dict]:
    """Every run of every seed. Each finished row is kept in ``OUT.progress.jsonl`` (``common.Progress``) at once,
    and a row already there (same canary count and quick flag) is kept instead of re-run, so a stopped measurement
    resumes where it stopped, in this session or a later one."""
    progress = Progress(out, canaries=m, quick=quick)
    rows = []
    for seed in seeds:
        for setting, overrides, scale in runs_for_seed(seed, quick, m):
            key = f"{setting}_{seed}"
            row = progress.get(key) or progress.add(
                key, {**run_setting(setting, overrides, seed, tmp, scale), "canaries": m, "quick": quick}
            )
            rows.append(row)
    return rows


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "n": len(values),
    }


def summary(rows: list[dict]) -> dict:
    out: dict[str, Any] = {"membership": {}, "privacy_audit": {}}
    for setting in MEMBERSHIP:
        rs = [r for r in rows if r["setting"] == setting and "membership" in r]
        if not rs:
            continue
        per = {
            name: {
                key: _stats([r["membership"]["attacks"][name][key] for r in rs])
                for key in ("auc", "tpr_at_fpr_0_001", "tpr_at_fpr_0_01")
            }
            for name in ATTACKS
        }
        strongest = [r["membership"]["strongest_attack"] for r in rs]
        per["strongest_attack_counts"] = {name: strongest.count(name) for name in ATTACKS}
        out["membership"][setting] = per
    for setting in [*SETTINGS, "drill_honest", "drill_broken"]:
        rs = [r for r in rows if r["setting"] == setting]
        if rs:
            out["privacy_audit"][setting] = {
                "claimed_epsilon": rs[0]["claimed_epsilon"],
                "epsilon_lower_bound": _stats([r["privacy_audit"]["epsilon_lower_bound"] for r in rs]),
                "opake_eps_delta": _stats([r["opake_eps_delta"] for r in rs]),
                "epsilon_max": rs[0]["privacy_audit"]["epsilon_max"],
                "fails": sum(r["checklist"]["status"] == "fail" for r in rs),
                "audit_seconds": _stats([r["privacy_audit"]["seconds"] for r in rs]),
                "audit_over_train": _stats([r["audit_over_train"] for r in rs]),
            }
    return out


def _ms(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def tables(result: dict) -> str:
    summ = result["summary"]
    lines = ["### Membership inference (mean ± std over seeds; report audit.membership.attacks)", ""]
    lines += ["| privacy | attack | AUC | TPR@0.1% FPR | TPR@1% FPR | strongest in |", "|---|---|---|---|---|---|"]
    for setting, per in summ["membership"].items():
        n = sum(per["strongest_attack_counts"].values())
        for name in ATTACKS:
            a = per[name]
            lines.append(
                f"| {setting} | {name} | {_ms(a['auc'])} | {_ms(a['tpr_at_fpr_0_001'])} | {_ms(a['tpr_at_fpr_0_01'])} "
                f"| {per['strongest_attack_counts'][name]}/{n} |"
            )
    lines += ["", "| seed | privacy | clean acc | attack | AUC (95% CI) | TPR@0.1% (95% CI) | TPR@1% |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in (r for r in result["rows"] if "membership" in r):
        for name in ATTACKS:
            a = r["membership"]["attacks"][name]
            mark = " **" if name == r["membership"]["strongest_attack"] else ""
            (lo, hi), (tlo, thi) = a["auc_ci95"], a["tpr_at_fpr_0_001_ci95"]
            lines.append(
                f"| {r['seed']} | {r['setting']} | {r['clean_accuracy']:.3f} | {name}{mark} | {a['auc']:.3f} "
                f"({lo:.3f}-{hi:.3f}) | {a['tpr_at_fpr_0_001']:.3f} ({tlo:.3f}-{thi:.3f}) | "
                f"{a['tpr_at_fpr_0_01']:.3f} |"
            )
    lines += ["", "### One-run privacy audit (mislabelled canaries; mean ± std over seeds, [min, max])", ""]
    lines += ["| setting | claimed eps | lower bound | opake | ceiling | fails | audit s | audit / train |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for setting, s in summ["privacy_audit"].items():
        claim = "-" if s["claimed_epsilon"] is None else f"{s['claimed_epsilon']:.2f}"
        b = s["epsilon_lower_bound"]
        lines.append(
            f"| {setting} | {claim} | {_ms(b)} [{b['min']:.2f}, {b['max']:.2f}] | {_ms(s['opake_eps_delta'])} | "
            f"{s['epsilon_max']:.2f} | {s['fails']}/{b['n']} | {_ms(s['audit_seconds'])} | "
            f"{_ms(s['audit_over_train'])} |"
        )
    lines += ["", "| seed | setting | claimed eps | bound | k+/k- | correct | opake | verdict | audit s | train s |"]
    lines += ["|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a = r["privacy_audit"]
        claim = "-" if r["claimed_epsilon"] is None else f"{r['claimed_epsilon']:.2f}"
        lines.append(
            f"| {r['seed']} | {r['setting']} | {claim} | {a['epsilon_lower_bound']:.3f} | {a['k_pos']}/{a['k_neg']} | "
            f"{a['correct']}/{a['guesses']} | {r['opake_eps_delta']:.3f} | {r['checklist']['status']} | "
            f"{a['seconds']:.1f} | {r['timings']['train']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--canaries", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="one seed, smoke jobs, 200 canaries: checks the script")
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    seeds, m = (args.seeds[:1], min(args.canaries, 200)) if args.quick else (args.seeds, args.canaries)
    out = args.out or (RESULTS.parent / "cpu-quick" if args.quick else RESULTS) / "privacy_eval.json"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="privacy_eval-") as folder:
        tmp = Path(folder)
        for key, value in (("KEY_FILE", "hmac.key"), ("ANCHOR_DIR", "anchors"), ("REGISTRY", "registry.json")):
            os.environ.setdefault(f"AISEC_TRAIN_{key}", str(tmp / value))  # nothing lands in ~/.config or outputs/
        rows = measure(seeds, args.quick, m, tmp, out)
    result = {
        "figure": "privacy_eval",
        "device": "cpu",
        "quick": args.quick,
        "seeds": seeds,
        "canaries": m,
        "settings": SETTINGS,
        "drill": {"recipe": drill_recipe(), "noise_scale": BROKEN_SCALE},
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    result["summary"] = summary(rows)
    print(tables(result))
    path = write("privacy_eval", result, out)
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

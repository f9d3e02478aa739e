"""Issue 24's evaluation-cost figure: the robustness stage's seconds over the training stage's, on the default
job and on a 28x28 job of >= 8k training images (typeset digits, scripts/figures/glyphs.py), and the sampled
robust accuracy's 95% interval against the whole split's number on the same model.

Each job runs the real command line once (default evaluation: a stratified sample of ``robustness.eval_samples``
with its interval, masking checks on a budget); then, in this process, the released model.pt is evaluated on the
whole test split twice: with today's default suite (the number the interval should contain) and with the previous
default (whole split, the more-steps check on every sample), timed in the same process for the before/after ratio.

    .venv/bin/python scripts/figures/eval_cost.py [--jobs default glyphs28] [--glyphs-epochs N] [--skip-previous]

Each stage's CPU seconds are sampled from the child process as well as its wall seconds: on the shared 2-core
machine the other jobs' load swings the wall seconds of one stage against another's (a run measured 0.145 and, an
hour later under 20x load, 0.58 for the same stages); ``robustness_over_train_cpu`` is the ratio to read. The audit
stage is off unless ``--audit``: it is neither training nor robustness.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS, own_stores, write

STAGE = re.compile(r"\]\[aisec_train\]\[INFO\] - stage (\w+)")
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, in seconds (/proc/PID/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def run_cli_cpu(args: list[str], run_dir: Path, poll: float = 0.25) -> tuple[dict, float, dict[str, float]]:
    """``aisec-train ARGS`` as common.run_cli, and each stage's CPU seconds: the child's CPU time sampled every
    ``poll`` seconds and charged to the stage its cli.log last announced. On a CPU shared with other jobs a stage's
    wall seconds depend on what else ran meanwhile; its CPU seconds do not, so their ratio is the one to read."""
    cmd = [sys.executable, "-m", "aisec_train", *args, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=own_stores(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    cpu: dict[str, float] = {}
    stage, last = "startup", 0.0
    log = run_dir / "cli.log"
    while proc.poll() is None:
        time.sleep(poll)
        now = _cpu_seconds(proc.pid)
        if now is None:
            break
        cpu[stage] = cpu.get(stage, 0.0) + now - last
        last = now
        if log.exists():
            found = STAGE.findall(log.read_text(errors="replace"))
            stage = found[-1] if found else stage
    stderr = proc.communicate()[1]
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"aisec-train {' '.join(args)} failed:\n{stderr[-2000:]}")
    return json.loads((run_dir / "report.json").read_text()), seconds, {k: round(v, 2) for k, v in cpu.items()}


def _model_and_split(overrides: list[str], run_dir: Path):
    """The run's released model and its test split, rebuilt from the same config (same split seed)."""
    from aisec_train.api import compose
    from aisec_train.data.dataset import load_dataset
    from aisec_train.data.views import materialize
    from aisec_train.models.factory import ModelFactory
    from aisec_train.train import checkpoint
    from aisec_train.train.config import PrivacyMode

    cfg = compose(overrides)
    data = load_dataset(cfg.dataset, seed=cfg.train.seed)
    norm = cfg.dataset.normalize
    factory = ModelFactory(
        cfg.model, input_shape=data.input_shape, num_classes=data.num_classes,
        private=cfg.privacy.mode is PrivacyMode.dpsgd,
        normalize=(norm.mean, norm.std) if norm.mean is not None else None,
    )  # fmt: skip
    model = factory(seed=0)
    model.load_state_dict(checkpoint.load(run_dir / "model.pt", root=run_dir))
    x, y = materialize(data.test)
    return model.eval(), x, y, cfg


def measure(name: str, overrides: list[str], tmp: Path, previous: bool = True) -> dict:
    from aisec_train.robust.evaluation import evaluate_robustness

    run_dir = tmp / name
    report, wall, cpu = run_cli_cpu(overrides, run_dir)
    stages = report["run"]["stage_seconds"]
    rob = report["robustness"]
    model, x, y, cfg = _model_and_split(overrides, run_dir)
    kw = dict(suite=cfg.robustness.eval, norm=cfg.robustness.attack.norm.value, eps=cfg.robustness.attack.eps)
    started = time.perf_counter()
    full = evaluate_robustness(model, x, y, seed=cfg.train.seed, **kw)
    full_seconds = time.perf_counter() - started
    before_seconds = None
    if previous:  # the previous default: the whole split, the more-steps check on every clean-correct sample
        started = time.perf_counter()
        evaluate_robustness(model, x, y, seed=cfg.train.seed, check_samples=None, **kw)
        before_seconds = time.perf_counter() - started
    lo, hi = rob["robust_accuracy_ci"]
    return {
        "job": name,
        "overrides": overrides,
        "n_train": report["data"]["n_train"],
        "n_test": report["data"]["n_test"],
        "stage_seconds": stages,
        "robustness_over_train": stages["robustness"] / stages["train"],
        # the same ratio in CPU seconds (sampled per stage): what the load of other jobs does not change
        "stage_cpu_seconds": cpu,
        "robustness_over_train_cpu": cpu.get("robustness", 0.0) / cpu["train"] if cpu.get("train") else None,
        "eval_samples": rob["eval_samples"],
        "robust_accuracy_sample": rob["robust_accuracy"],
        "robust_accuracy_ci": [lo, hi],
        "robust_accuracy_full_split": full["robust_accuracy"],
        "full_split_inside_ci": lo <= full["robust_accuracy"] <= hi,
        "full_split_seconds_now": full_seconds,
        "full_split_seconds_previous_default": before_seconds,
        "previous_default_over_train": None if before_seconds is None else before_seconds / stages["train"],
        # the same suite on the whole split, here, over the stage's training seconds (no checks sized down)
        "full_split_now_over_train": full_seconds / stages["train"],
        "clean_accuracy": report["metrics"]["clean_accuracy"],
        "wall_seconds": wall,
    }


def glyphs28(tmp: Path, n: int) -> Path:
    """Typeset digits at 24x24 (glyphs.py renders at sizes dividing 48), padded by 2 blank pixels to MNIST's 28x28."""
    import numpy as np

    raw = tmp / "glyphs24.npz"
    cmd = [sys.executable, str(REPO / "scripts/figures/glyphs.py"), "--out", str(raw), "--n", str(n)]
    subprocess.run([*cmd, "--size", "24", "--alphabet", "digits"], check=True, cwd=REPO)
    data = np.load(raw)
    path = tmp / "glyphs28.npz"
    np.savez(path, x=np.pad(data["x"], ((0, 0), (2, 2), (2, 2))), y=data["y"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=["default", "glyphs28"], default=["default", "glyphs28"])
    parser.add_argument("--glyphs", type=int, default=10000, help="typeset 28x28 digits (80%% train)")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs override (default: the job's)")
    parser.add_argument("--glyphs-epochs", type=int, default=None, help="train.epochs of the 28x28 job only")
    parser.add_argument("--audit", action="store_true", help="keep the audit stage (off: it is not measured here)")
    parser.add_argument("--skip-previous", action="store_true", help="do not time the previous default again")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_cost.json")
    args = parser.parse_args()
    extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for job in args.jobs:
            # the audit stage is neither training nor robustness: off saves its minutes on two shared cores
            overrides = [*extra, *([] if args.audit else ["audit=off"])]
            if job == "glyphs28":
                overrides += ["dataset=npz", f"dataset.path={glyphs28(tmp, args.glyphs)}"]
                overrides += [f"train.epochs={args.glyphs_epochs}"] if args.glyphs_epochs else []
            rows.append(measure(job, overrides, tmp, previous=not args.skip_previous))
            print(rows[-1], file=sys.stderr)
    result = {
        "figure": "robustness stage cost vs training, sampled evaluation's interval vs the whole split (issue 24)",
        "device": "cpu (2 cores, shared with other jobs: timings are noisy; read the ratios)",
        "goal": "robustness stage <= 0.25 x training stage; the whole split's robust accuracy inside the 95% CI",
        "read": "robustness_over_train_cpu (CPU seconds per stage): wall seconds swing with the other jobs' load",
        "rows": rows,
    }
    write("eval_cost", result, args.out)
    print(
        "| job | n_train/n_test | train s | robustness s | ratio (wall) | ratio (CPU) | sample RA [95% CI] | "
        "full-split RA |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        s = r["stage_seconds"]
        print(
            f"| {r['job']} | {r['n_train']}/{r['n_test']} | {s['train']:.1f} | {s['robustness']:.1f} | "
            f"{r['robustness_over_train']:.3f} | {r['robustness_over_train_cpu'] or float('nan'):.3f} | "
            f"{r['robust_accuracy_sample']:.3f} [{r['robust_accuracy_ci'][0]:.3f}, {r['robust_accuracy_ci'][1]:.3f}]"
            f" ({r['eval_samples']}) | {r['robust_accuracy_full_split']:.3f} |"
        )


if __name__ == "__main__":
    main()

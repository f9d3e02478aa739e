"""The summary of a multirun sweep: one row per run, as a markdown table, a CSV and a PNG.

Hydra calls :class:`SweepSummary` when a multirun ends (``configs/config.yaml`` registers it), whatever the
launcher: local, submitit-local or SLURM. ``aisec-train-sweep SWEEP_DIR`` rebuilds the summary, e.g. after
jobs that were resubmitted or finished on their own. Each run contributes its ``report.json``; the columns are
what a sweep is usually about: clean and robust accuracy against epsilon.

    aisec-train -m privacy.target_epsilon=1,3,8 robustness=none,pgd_at
    aisec-train-sweep multirun/DATE/TIME
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from aisec_train import errors
from aisec_train.store.files import atomic_write, safe_open_for_write

PROG = "aisec-train-sweep"
log = logging.getLogger("aisec_train")
COLUMNS = [
    "run",
    "overrides",
    "clean_accuracy",
    "robust_accuracy",
    "epsilon",
    "target_epsilon",
    "adversarial_training",
    "seconds",
]


class SweepError(errors.Refusal, ValueError):
    """A run's report.json that is not an aisec-train report (one line, exit 2)."""


def _section(report: Any, name: str, path: Path) -> dict[str, Any]:
    """``report[name]`` as a dict (missing or null: empty); anything else is not a report this summary reads."""
    if not isinstance(report, dict):
        raise SweepError(f"{path} is not an aisec-train report: a JSON {type(report).__name__}, not an object")
    value = report.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{path} is not an aisec-train report: {name!r} is a {type(value).__name__}, not an object")
    return value


def _number(value: Any, key: str, path: Path) -> Any:
    """A figure of the summary: a number or null (a string, a list or a bool is not a figure)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise SweepError(f"{path} is not an aisec-train report: {key}={value!r} is not a number or null")


def _row(run_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    try:  # a truncated, non-UTF-8 or unreadable report names its file (json's own message names no file)
        report = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        reason = " ".join(str(err).split())
        raise SweepError(f"{path} is not an aisec-train report: not UTF-8 JSON ({reason})") from None
    except OSError as err:  # a folder named report.json, no permission
        raise SweepError(f"{path} cannot be read as a report ({err.strerror}); nothing was written") from None
    privacy, robust = _section(report, "privacy", path), _section(report, "robustness", path)
    metrics, run = _section(report, "metrics", path), _section(report, "run", path)
    timings = _section(run, "timings", path)
    seconds = sum(_number(v, f"run.timings.{k}", path) or 0 for k, v in timings.items())
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = ""
    if overrides_file.is_file():  # a YAML list of "key=value" lines
        overrides = " ".join(line[2:].strip() for line in overrides_file.read_text().splitlines() if line[:2] == "- ")
    return {
        "run": str(run_dir.relative_to(sweep_dir)),
        "overrides": overrides,
        "clean_accuracy": _number(metrics.get("clean_accuracy"), "metrics.clean_accuracy", path),
        "robust_accuracy": _number(robust.get("robust_accuracy"), "robustness.robust_accuracy", path),
        "epsilon": _number(privacy.get("epsilon"), "privacy.epsilon", path),
        "target_epsilon": _number(privacy.get("target_epsilon"), "privacy.target_epsilon", path),
        "adversarial_training": robust.get("training"),
        "seconds": round(seconds, 1),
    }


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``sweep_summary.{md,csv,png}`` into ``sweep_dir``; return the rows (runs without a report skipped)."""
    if not sweep_dir.is_dir():
        what = "is a file, not a sweep folder" if sweep_dir.exists() else "does not exist"
        raise FileNotFoundError(f"sweep directory {sweep_dir} {what}")
    reports = sorted(sweep_dir.glob("**/report.json"), key=lambda p: (len(p.parts), str(p)))
    rows = [_row(p.parent, sweep_dir) for p in reports]
    _write_markdown(rows, sweep_dir / "sweep_summary.md")
    with safe_open_for_write(sweep_dir / "sweep_summary.csv", root=sweep_dir, mode="w") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        _plot(rows, sweep_dir / "sweep_summary.png")
    return rows


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if column == "seconds" else f"{value:.4f}"
    return str(value)


def _write_markdown(rows: list[dict[str, Any]], path: Path) -> None:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row[c], c) for c in COLUMNS) + " |" for row in rows]
    runs = f"{len(rows)} run" + ("s" if len(rows) != 1 else "")
    atomic_write(path, f"# Sweep summary ({runs})\n\n" + "\n".join(lines) + "\n", root=path.parent)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eps, ax_runs) = plt.subplots(1, 2, figsize=(11, 4))
    # Left: accuracy against epsilon, one marker per run (non-private runs at the right edge, labelled).
    finite = [r["epsilon"] for r in rows if r["epsilon"] is not None]
    no_dp_x = (max(finite) * 1.5) if finite else 1.0
    for key, marker in (("clean_accuracy", "o"), ("robust_accuracy", "s")):
        xs = [r["epsilon"] if r["epsilon"] is not None else no_dp_x for r in rows if r[key] is not None]
        ys = [r[key] for r in rows if r[key] is not None]
        ax_eps.scatter(xs, ys, marker=marker, label=key.replace("_", " "))
    ax_eps.set_xlabel(f"epsilon (non-private runs at {no_dp_x:.3g})")
    ax_eps.set_ylabel("accuracy")
    ax_eps.legend()
    # Right: every run side by side, labelled by its overrides.
    index = range(len(rows))
    ax_runs.bar([i - 0.2 for i in index], [r["clean_accuracy"] or 0 for r in rows], width=0.4, label="clean")
    ax_runs.bar([i + 0.2 for i in index], [r["robust_accuracy"] or 0 for r in rows], width=0.4, label="robust")
    ax_runs.set_xticks(list(index), [r["overrides"] or r["run"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax_runs.set_ylabel("accuracy")
    ax_runs.legend()
    fig.tight_layout()
    with safe_open_for_write(path, root=path.parent) as fh:  # atomic, never through a symlink
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize(sweep_dir)
        log.info("sweep summary of %d run(s): %s", len(rows), sweep_dir / "sweep_summary.md")


def check_sweep_dir(sweep_dir: Path) -> None:
    """Refuse, before writing a summary into it, a folder that is not a sweep: one without the ``multirun.yaml``
    Hydra saves into every ``hydra.sweep.dir`` when a sweep starts, whatever the launcher, and without any run's
    ``report.json`` (runs gathered into one folder by hand are still summarised)."""
    if not sweep_dir.is_dir() or (sweep_dir / "multirun.yaml").is_file():
        return  # summarize words a missing folder or a file
    if next(sweep_dir.glob("**/report.json"), None) is None:
        raise FileNotFoundError(
            f"{sweep_dir} is not a sweep folder: it holds no multirun.yaml and no run's report.json; give the "
            "hydra.sweep.dir of an aisec-train -m run"
        )


def main(argv: list[str] | None = None) -> None:
    parser = errors.RefusingParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    with errors.refusing(PROG, FileNotFoundError, json.JSONDecodeError, KeyError, errors.Refusal):  # a symlink
        check_sweep_dir(args.sweep_dir)
        rows = summarize(args.sweep_dir)
    print((args.sweep_dir / "sweep_summary.md").read_text())
    if not rows:  # a sweep whose runs all failed is a result to report, not bad input: exit 1, not 2
        print(f"aisec-train-sweep: error: no report.json under {args.sweep_dir}", file=sys.stderr)
        sys.exit(1)

"""Issue 21 items 5-6: how much a run prints, and what its end says.

Two real runs of the command line: a tiny federated job (Flower simulation, 4 clients, 1 round) and the smoke
job at sample rate 1 (the batch is the whole digits training split). Counted in their console output: all lines,
Flower's lines and repeated ones, library noise (deprecation, alembic, Ray's tip, Flower DEBUG), numpy's
"divide by zero" warnings, the summary block's lines, and the checklist's fails without a fix.

    .venv/bin/python scripts/figures/end_of_run.py   # about 3 min on 2 idle cores
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, own_stores, write  # scripts/figures/common.py

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

FEDERATED = [
    "experiment=federated_he", "audit=off", "robustness.evaluate=false", "privacy=none", "federated.rounds=1",
    "federated.local_epochs=1", "federated.ray_num_cpus=2", "federated.client_cpus=1",
]  # fmt: skip
SAMPLE_RATE_ONE = ["experiment=smoke", "audit=off", "robustness.eval_samples=60", "train.batch_size=1437"]
NOISE = ("DEPRECATED FEATURE", "alembic", "Tip: In future versions of Ray", "[flwr][DEBUG]", "\x1b[92mINFO")


def measure(args: list[str], run_dir: Path) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "aisec_train", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, env=own_stores(run_dir),
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"aisec-train {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("train:")]  # tqdm aside
    flower = [line.split(" - ", 1)[1] for line in lines if "][flwr][" in line]
    block = proc.stdout[proc.stdout.index("aisec-train: run finished") :].splitlines()
    fails = [line for line in block if line.strip().startswith("FAIL")]
    return {
        "command": "aisec-train " + " ".join(args),
        "seconds": round(time.perf_counter() - started, 1),
        "console_lines": len(lines),
        "flower_lines": len(flower),
        "flower_lines_repeated": len(flower) - len(set(flower)),
        "noise_lines": sum(any(n in line for n in NOISE) for line in lines),
        "divide_by_zero_warnings": out.count("divide by zero"),
        "sample_rate_one_notes": out.count("no privacy amplification"),
        "summary_lines": len(block),
        "failing_items": len(fails),
        "failing_items_with_fix": sum(
            "fix:" in after for line, after in zip(block, block[1:], strict=False) if "FAIL" in line
        ),
        "summary": block,
    }


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "federated": measure(FEDERATED, Path(tmp) / "fed"),
            "sample_rate_one": measure(SAMPLE_RATE_ONE, Path(tmp) / "smoke"),
            "before (issue 21)": {
                "federated_console_lines": 130,
                "flower_lines": "each twice",
                "divide_by_zero_warnings": 8,
                "setup_lines": 500,
            },  # fmt: skip
        }
    print(write("end_of_run", result, args.out))


if __name__ == "__main__":
    main()

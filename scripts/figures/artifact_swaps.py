"""Figure: artifact substitutions against the registry, all refused (issue 21, item 2).

Each swap of tests/swaps.py is built with the real writers (model.pt + keyed tag + report.json) under a throwaway
key, then ``aisec-train-registry register | mark-good | rollback`` is run on it; the figure counts the refusals
(exit 2, one line). With ``--real`` (default) the issue's own scenario is also run end to end: two real
``aisec-train`` smoke runs (DP on digits, non-DP on synthetic data), the non-DP model.pt + tag copied into the DP
run's folder, then the installed ``aisec-train-registry`` register / mark-good / rollback.

    .venv/bin/python scripts/figures/artifact_swaps.py [--no-real]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from aisec_train.errors import RefusingParser

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.figures.common import REPO, run_cli, write  # noqa: E402

SMOKE = ["experiment=smoke", "audit=off", "robustness.evaluate=false"]


def synthetic_swaps(root: Path) -> list[dict]:
    from tests.swaps import SWAPS, attempt, refused

    rows = []
    for swap in SWAPS:
        code, err = attempt(swap, root / swap.name)
        rows.append({"swap": swap.name, "what": swap.what, "command": swap.command, "exit": code,
                     "refused": refused(code, err), "message": err.strip()})  # fmt: skip
    return rows


def real_scenario(root: Path) -> list[dict]:
    """The issue's scenario with real runs and the installed console script."""
    dp, plain = root / "dp" / "run", root / "plain" / "run"
    run_cli([*SMOKE], dp)
    run_cli([*SMOKE, "privacy=none", "dataset=synthetic"], plain)
    for name in ("model.pt", "model.pt.tag", "model.pt.sha256"):
        shutil.copyfile(plain / name, dp / name)
    from aisec_train.audit.registry import Registry

    registry = dp.with_name(dp.name + "-registry.json")  # where the DP run registered itself (common.own_stores)
    honest = Registry(registry).entries()[-1]["id"]
    script = [str(Path(sys.executable).with_name("aisec-train-registry")), "--registry", str(registry)]
    rows = []
    for args in (["register", str(dp)], ["mark-good", honest], ["rollback", "--dest", str(root / "back.pt")]):
        proc = subprocess.run([*script, *args], capture_output=True, text=True, cwd=REPO)
        ok = proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        rows.append({"swap": f"real-issue-scenario-{args[0]}", "command": args[0], "exit": proc.returncode,
                     "refused": ok, "message": proc.stderr.strip()})  # fmt: skip
    return rows


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-real", action="store_true", help="skip the two real training runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["AISEC_TRAIN_KEY_FILE"] = str(root / "keys" / "hmac.key")
        os.environ["AISEC_TRAIN_ANCHOR_DIR"] = str(root / "keys" / "anchors")
        rows = synthetic_swaps(root / "synthetic")
        if not args.no_real:
            rows += real_scenario(root / "real")
    result = {"swaps": len(rows), "refused": sum(r["refused"] for r in rows), "rows": rows}
    print(f"{result['refused']} of {result['swaps']} substitutions refused -> {write('artifact_swaps', result)}")


if __name__ == "__main__":
    main()

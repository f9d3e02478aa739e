"""Figure: tracebacks over every numeric config key's extremes and 20+ malformed Dataset item kinds (goal 0).

Three sweeps, each case ending "accepted", "refused" (one line: exit 2, or ConfigError / DataError through the
API) or a traceback, which is what the figure counts:

1. config: every int/float key of the schema (read from the dataclasses, tests/fuzzing.py ``numeric_keys``) at
   each extreme (5e-324, 1e-300, 1e-12, 1e12, 1e300, inf, -inf, nan, -1, 0, 2^63, 10^30 ...), composed and
   type-checked as the CLI does;
2. cli: the extremes a config accepts and that reach training (tiny delta or target epsilon, huge learning rate,
   clip, noise, weight decay, ...), each run end to end by ``aisec-train`` in-process on the smoke job;
3. api: every malformed item kind through ``aisec_train.run`` and ``aisec_train.fit`` (at item 17 of 40).

    .venv/bin/python scripts/figures/fuzz_edges.py [--quick]     # --quick: config sweep on every 7th case
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from aisec_train.errors import RefusingParser

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.figures.common import write  # noqa: E402

CLI_EXTREMES = [
    "privacy.delta=1e-300", "privacy.delta=5e-324", "privacy.delta=1e-300 privacy.accountant=rdp",
    "privacy.delta=1e-300 privacy.noise_multiplier=1.0", "privacy.target_epsilon=1e-300",
    "privacy.target_epsilon=1e-12", "privacy.target_epsilon=1e300", "privacy.noise_multiplier=1e300",
    "privacy.noise_multiplier=1e30",
    "privacy.max_grad_norm=1e-300", "privacy.max_grad_norm=1e300", "train.lr=1e300", "train.lr=1e-300",
    "train.lr=1e300 privacy=none", "train.weight_decay=1e300", "train.momentum=5e-324", "train.ema_decay=5e-324",
    "train.batch_size=2147483648", "train.max_physical_batch_size=2147483648", "dataset.test_fraction=5e-324",
    "dataset.outlier_z=5e-324", "dataset.outlier_z=1e300", "dataset.workers=2147483648",
    "dataset.augment.random_crop_padding=2147483648", "train.distributed.nproc=2147483648",
    "robustness.evaluate=true robustness.eval_samples=8 robustness.attack.eps=inf",
    "robustness.evaluate=true robustness.eval_samples=8 robustness.attack.eps=1e300",
]  # fmt: skip


def outcome_of(code: int | None, err: str, crash: str) -> str:
    if crash or "Traceback" in err:
        return "traceback"
    return {0: "accepted", 2: "refused"}.get(code, f"exit {code}")


def sweep_config(quick: bool) -> list[dict]:
    from tests.fuzzing import BASE, _number, config_outcome, extremes, numeric_keys

    cases = [(k, v) for k, kind in numeric_keys().items() for v in extremes(kind)]
    rows = []
    for key, value in cases[:: 7 if quick else 1]:
        found = config_outcome([*BASE, f"{key}={_number(value)}"])
        rows.append({"case": f"{key}={_number(value)}", "outcome": found if found in ("accepted", "refused") else
                     "traceback", "detail": "" if found in ("accepted", "refused") else found[-600:]})  # fmt: skip
    return rows


def sweep_cli(root: Path) -> list[dict]:
    from tests.fuzzing import BASE, call_cli

    rows = []
    for i, case in enumerate(CLI_EXTREMES):
        os.environ["AISEC_TRAIN_LEDGER_STORE"] = str(root / f"ledgers{i}")
        os.environ["AISEC_TRAIN_REGISTRY"] = str(root / f"registry{i}.json")
        started = time.perf_counter()
        code, err, crash = call_cli([*BASE, *case.split(), f"hydra.run.dir={root / f'run{i}'}"])
        rows.append({"case": case, "outcome": outcome_of(code, err, crash), "seconds": round(time.perf_counter() -
                     started, 1), "detail": (crash or err).strip()[-600:]})  # fmt: skip
    return rows


def sweep_api(root: Path) -> list[dict]:
    from tests.fuzzing import MALFORMED_KINDS, api_outcome, malformed_dataset

    os.environ["AISEC_TRAIN_REGISTRY"] = str(root / "api-registry.json")
    rows = []
    for kind in (*MALFORMED_KINDS, "empty"):
        for entry in ("run", "train"):
            found = api_outcome(entry, malformed_dataset(kind, at=17), run_dir=root / f"api-{len(rows)}")
            ok = found in ("accepted", "refused")
            rows.append({"case": f"{entry}: {kind}", "outcome": found if ok else "traceback",
                         "detail": "" if ok else found[-600:]})  # fmt: skip
    return rows


def summary(rows: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    return {"cases": len(rows), "tracebacks": counts.get("traceback", 0), "outcomes": counts}


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="config sweep on every 7th case")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["AISEC_TRAIN_KEY_FILE"] = str(root / "keys" / "hmac.key")
        os.environ["AISEC_TRAIN_ANCHOR_DIR"] = str(root / "keys" / "anchors")
        sweeps = {"api": sweep_api(root), "cli": sweep_cli(root), "config": sweep_config(args.quick)}
    result = {name: {**summary(rows), "rows": rows} for name, rows in sweeps.items()}
    result["tracebacks"] = sum(r["tracebacks"] for r in result.values() if isinstance(r, dict))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["quick"] = args.quick
    path = write("fuzz_edges", result)
    parts = ", ".join(f"{name}: {result[name]['cases']} cases" for name in sweeps)
    print(f"{result['tracebacks']} tracebacks ({parts}) -> {path}")


if __name__ == "__main__":
    main()

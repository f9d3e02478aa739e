"""Issue 14, figure 1: 100 clients, 10% sampled per round, Dirichlet(0.5), CKKS, on 20k typeset digits.

Runs ``aisec-train experiment=federated_scale dataset=npz dataset.path=<glyph digits>`` (CKKS, 100 clients,
fraction_train 0.1; ``--dp none client record``: without DP, client-level DP-FedAvg, each client's DP-SGD) through the
real command line and records: wall time per round (server-timed training rounds; round 1 carries Ray's start-up and
is reported apart), the peak memory (PSS) of the job and every process it started (Ray's GCS, raylet and the client
actors, sampled from /proc), bytes per parameter uploaded (goal <= 40), clients sampled per round, accuracy and the
epsilon. ``--plaintext`` adds the plaintext run of the same seed beside it. Resources: 2 Ray CPUs, one
per client actor, so two clients train at a time whatever the federation's size.

    .venv/bin/python scripts/figures/federated_scale.py            # full: 20k digits, 10 rounds (~15 min, 2 cores)
    .venv/bin/python scripts/figures/federated_scale.py --quick    # 4k digits, 3 rounds
    .venv/bin/python scripts/figures/federated_scale.py --clients 10 100   # memory and round time against N
Writes ``benchmarks/results/cpu/federated_scale.json`` and a markdown table.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from common import RESULTS, Progress, write
from fed_common import glyph_digits, markdown, run_measured

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

DP = {
    "none": ["privacy=none"],
    "client": ["privacy=none", "federated.dp=client"],
    "record": ["privacy=dpsgd", "federated.dp=record"],
}


def case(report: dict, seconds: float, peak: int) -> dict:
    fed = report["federated"]
    rounds = fed["train_round_s_per_round"]
    steady = rounds[1:] or rounds
    return {
        "aggregation": fed["aggregation"],
        "clients": fed["clients"],
        "fraction_train": fed["sampling"]["fraction_train"],
        "cohort_per_round": fed["sampling"]["cohort_per_round"],
        "partition": fed["partition"]["kind"],
        "alpha": fed["partition"].get("alpha"),
        "rounds": fed["rounds"],
        "first_round_s": round(rounds[0], 2),
        "round_s_median": round(statistics.median(steady), 2),
        "round_s": [round(r, 2) for r in rounds],
        "wall_seconds": round(seconds, 1),
        "peak_pss_mib": round(peak / 2**20, 1),
        "bytes_per_param": fed["bytes_per_param"],
        "clean_accuracy": report["metrics"]["clean_accuracy"],
        "accuracy_per_round": fed["accuracy_per_round"],  # on the sampled evaluators' shards
        "epsilon": report["privacy"]["epsilon"],
        "privacy_level": report["privacy"].get("level"),
    }


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4k digits, 3 rounds (for a first look)")
    parser.add_argument("--n", type=int, default=None, help="typeset digits to generate (default 20000)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--plaintext", action="store_true", help="also run the same job with plaintext aggregation")
    parser.add_argument("--clients", type=int, nargs="+", default=[100], help="e.g. 10 100: memory flat in N")
    parser.add_argument("--dp", nargs="+", default=None, choices=sorted(DP), help="default: none client")
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    n = args.n or (4000 if args.quick else 20000)
    rounds = args.rounds or (3 if args.quick else 10)
    data = glyph_digits(n)
    base = [
        "experiment=federated_scale", "dataset=npz", f"dataset.path={data}", f"federated.rounds={rounds}",
        "federated.ray_num_cpus=2", "federated.client_cpus=1", "audit=off", "robustness.evaluate=false",
    ]  # fmt: skip
    name = "federated_scale_quick" if args.quick else "federated_scale"
    out = args.out or RESULTS / f"{name}.json"
    progress = Progress(out, n=n, rounds=rounds)  # each finished job is kept: a stopped figure resumes
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.dp or (["none"] if args.quick else ["none", "client"]):
            for n_clients in args.clients:
                for agg in ("ckks", "plaintext") if args.plaintext else ("ckks",):
                    key = f"{level}_{agg}_{n_clients}"
                    row = progress.get(key)
                    if row is None:
                        cmd = [*base, *DP[level], f"federated.aggregation={agg}", f"federated.clients={n_clients}"]
                        report, seconds, peak = run_measured(cmd, Path(tmp) / key)
                        row = progress.add(key, {"dp": level, **case(report, seconds, peak)})
                    rows.append(row)
    keys = ["dp", "aggregation", "clients", "fraction_train", "rounds", "first_round_s", "round_s_median",
            "peak_pss_mib", "bytes_per_param", "clean_accuracy", "epsilon"]  # fmt: skip
    print(markdown(rows, keys))
    # the figure: the largest federation under CKKS (rows may also hold smaller N or plaintext runs)
    headline = max((r for r in rows if r["aggregation"] == "ckks"), key=lambda r: r["clients"], default=rows[0])
    result = {
        "benchmark": "federated_scale",
        "device": "cpu",
        "quick": args.quick,
        "n_images": n,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": [
            {"impl": f"{r['dp']}-{r['aggregation']}-{r['clients']}", "seconds": r["round_s_median"], **r} for r in rows
        ],
        "ratios": {"bytes_per_param": headline["bytes_per_param"], "peak_pss_mib": headline["peak_pss_mib"]},
        "goals": {"bytes_per_param_max": 40},
    }
    print("wrote", write(name, result, out))


if __name__ == "__main__":
    main()

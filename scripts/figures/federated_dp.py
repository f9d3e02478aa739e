"""Issue 14, figure 2: client-level DP at epsilon 3 against record-level DP at epsilon 3, 20 and 100 clients,
each under plaintext and CKKS aggregation, on typeset digits (20k by default).

Every run goes through the real command line on the same data, seed and schedule; only the unit of privacy
changes (both accounted by Opacus' RDP accountant at delta 1e-5):
- record: ``privacy=dpsgd privacy.target_epsilon=3``: each client runs DP-SGD with its own ledger (the epsilon
  reported is the largest over clients and protects one example);
- client: ``privacy=none federated.dp=client federated.client_dp.target_epsilon=3``: DP-FedAvg with distributed
  noise shares, accounted per round at the client sampling rate (protects all of one client's data).
All clients take part in every round (``fraction_train=1``, the cross-silo setting: the best case for client-level
DP at these federation sizes). Client-level noise is drawn seeded (``secure_noise=false``) so that the plaintext
and CKKS runs add the same noise and differ only by the aggregation: their gap is the figure's "within 1 point".

    .venv/bin/python scripts/figures/federated_dp.py            # full: 20k digits, 20 and 100 clients, 5 rounds
    .venv/bin/python scripts/figures/federated_dp.py --quick    # 2k digits, 20 clients, 1 round
Writes ``benchmarks/results/cpu/federated_dp.json`` and a markdown table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import RESULTS, Progress, write
from fed_common import glyph_digits, markdown, run_measured

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

LEVELS = {
    "record": ["privacy=dpsgd", "privacy.target_epsilon=3", "privacy.accountant=rdp", "federated.dp=record"],
    "client": [
        "privacy=none",
        "federated.dp=client",
        "federated.client_dp.target_epsilon=3",
        "federated.client_dp.secure_noise=false",
    ],  # fmt: skip
}


def _row(report: dict, k: int, level: str, agg: str, seconds: float, peak: int) -> dict:
    p, fed = report["privacy"], report["federated"]
    return {
        "clients": k,
        "dp": level,
        "aggregation": agg,
        "clean_accuracy": report["metrics"]["clean_accuracy"],
        "epsilon": p["epsilon"],
        "delta": p["delta"],
        "noise_multiplier": p["noise_multiplier"],
        "privacy_level": p.get("level"),
        "rounds": fed["rounds"],
        "wall_seconds": round(seconds, 1),
        "peak_pss_mib": round(peak / 2**20, 1),
        "bytes_per_param": fed["bytes_per_param"],
    }


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    n = args.n or (2000 if args.quick else 20000)
    rounds = args.rounds or (1 if args.quick else 5)
    clients = args.clients or ([20] if args.quick else [20, 100])
    data = glyph_digits(n)
    name = "federated_dp_quick" if args.quick else "federated_dp"
    out = args.out or RESULTS / f"{name}.json"
    progress = Progress(out, n=n, rounds=rounds)  # each finished job is kept: a stopped figure resumes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in clients:
            for level, overrides in LEVELS.items():
                for agg in ("plaintext", "ckks"):
                    key = f"{k}_{level}_{agg}"
                    row = progress.get(key)
                    if row is not None:
                        rows.append(row)
                        continue
                    cmd = [
                        "federated=fedavg_he", "dataset=npz", f"dataset.path={data}", f"federated.clients={k}",
                        f"federated.aggregation={agg}", f"federated.rounds={rounds}", "federated.local_epochs=2",
                        "federated.fraction_train=1.0", "federated.min_clients=2", "federated.batch_size=64",
                        "federated.lr=0.1", "federated.ray_num_cpus=2", "audit=off", "robustness.evaluate=false",
                        *overrides,
                    ]  # fmt: skip
                    report, seconds, peak = run_measured(cmd, Path(tmp) / key)
                    rows.append(progress.add(key, _row(report, k, level, agg, seconds, peak)))
    gaps = {}
    for k in clients:
        for level in LEVELS:
            acc = {r["aggregation"]: r["clean_accuracy"] for r in rows if r["clients"] == k and r["dp"] == level}
            gaps[f"ckks_minus_plaintext_{level}_{k}"] = acc["ckks"] - acc["plaintext"]
    print(markdown(rows, ["clients", "dp", "aggregation", "clean_accuracy", "epsilon", "noise_multiplier",
                          "wall_seconds", "bytes_per_param"]))  # fmt: skip
    print(gaps)
    result = {
        "benchmark": "federated_dp",
        "device": "cpu",
        "quick": args.quick,
        "n_images": n,
        "rows": [
            {"impl": f"{r['dp']}-{r['aggregation']}-{r['clients']}", "seconds": r["wall_seconds"], **r} for r in rows
        ],  # fmt: skip
        "ratios": gaps,
        "goals": {"abs_ckks_minus_plaintext_max": 0.01},
    }
    print("wrote", write(name, result, out))


if __name__ == "__main__":
    main()

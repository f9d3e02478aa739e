"""The private step's noise: Opacus' per-tensor secure-mode draw against ours per group (privacy/noise.py).

For each model of ``dpsgd.py`` (its parameter tensors, one step's noise), both draws run interleaved in rounds
(A B, then B A), and the ratio is the median over rounds of Opacus' time over ours, with the interquartile range.
Both draw the same mechanism from a generator seeded from OS entropy (privacy/randomness.py), Opacus' secure mode
on: half the sum of four Gaussian draws per coordinate, then ``scale_grad``'s division by the batch.

    python benchmarks/flat_noise.py --device cpu --threads 1 --out benchmarks/results/cpu/flat_noise.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, parse_args  # noqa: E402
from dpsgd import MODELS, make_model  # noqa: E402
from opacus.optimizers import DPOptimizerFastGradientClipping  # noqa: E402

from aisec_train.privacy.noise import flat_secure_noise  # noqa: E402
from aisec_train.privacy.randomness import secret_generator  # noqa: E402


def _noise_step(params: list[torch.nn.Parameter], grouped: bool, device: str):
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=256,
        generator=secret_generator(device),
    )  # fmt: skip
    optimizer.secure_mode = True
    if grouped:
        assert flat_secure_noise(optimizer)
    sums = [torch.randn_like(p) for p in params]

    def step() -> None:
        for p, s in zip(params, sums, strict=True):
            p.summed_grad = s.clone()  # Opacus' accumulate: a fresh copy of the clipped sum every step
        optimizer.add_noise()
        optimizer.scale_grad()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def _seconds(step, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    def extra(parser):
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
        parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15, --quick 5)")

    args = parse_args("Opacus' per-tensor secure noise against ours per group", extra)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    rows, ratios = [], {}
    for key, (name, channels, size, *_rest) in MODELS.items():
        params = list(make_model(name, channels, size).to(args.device).parameters())
        count = sum(p.numel() for p in params)
        repeats = max(1, int(2e6 // count)) if not args.quick else 1  # each timed sample draws >= 2M coordinates
        steps = {"opacus": _noise_step(params, False, args.device), "ours": _noise_step(params, True, args.device)}
        for step in steps.values():  # warm-up: first allocations
            _seconds(step, repeats)
        times: dict[str, list[float]] = {"opacus": [], "ours": []}
        for r in range(rounds):
            order = ["opacus", "ours"] if r % 2 == 0 else ["ours", "opacus"]
            for impl in order:
                times[impl].append(_seconds(steps[impl], repeats))
        per_round = [o / u for o, u in zip(times["opacus"], times["ours"], strict=True)]
        q1, median, q3 = statistics.quantiles(per_round, n=4)
        for impl, ts in times.items():
            rows.append({"impl": impl, "model": key, "tensors": len(params), "parameters": count,
                         "seconds": statistics.median(ts), "times": ts})  # fmt: skip
        ratios[f"ours_vs_opacus_{key}"] = median
        ratios[f"ours_vs_opacus_{key}_iqr"] = [q1, q3]
    result_rows = [{k: v for k, v in r.items() if k != "times"} for r in rows]
    emit("flat_noise", args.device, result_rows, {k: v for k, v in ratios.items() if not k.endswith("_iqr")}, None)
    if args.out is not None:
        import json

        from common import device_name

        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "flat_noise", "device": device_name(args.device), "threads": torch.get_num_threads(),
                   "rounds": rounds, "rows": rows, "ratios": ratios}  # fmt: skip
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

"""The benchmark contract shared by every script in benchmarks/.

Each script takes ``--quick`` and ``--out FILE.json`` and writes
``{"benchmark", "device", "rows": [{"impl", "seconds", ...}], "ratios": {"X_vs_Y": Y_time / X_time}}``
plus a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = RefusingParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes on the CPU, under a minute")
    parser.add_argument("--out", type=output_file, default=None, help="where to write the JSON result")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    if extra:
        extra(parser)
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    elif not usable_device(args.device):  # every implementation's every round used to fail on it, one by one
        gpus = torch.cuda.device_count()
        allowed = (
            f"auto, cpu, cuda or cuda:0 to cuda:{gpus - 1}" if gpus else "auto or cpu (this machine has no CUDA GPU)"
        )
        parser.exit(2, f"{Path(parser.prog).stem}: --device {args.device} is not allowed: {allowed}\n")
    return args


def usable_device(name: str) -> bool:
    """``cpu``, or a CUDA device this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return device.type == "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], device: str, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def ratio(rows: list[dict], fast: str, slow: str, **match) -> float:
    """``slow``'s time over ``fast``'s time among rows that agree on ``match``: above 1 means ``fast`` wins."""

    def pick(impl: str) -> dict:
        return next(r for r in rows if r["impl"] == impl and all(r.get(k) == v for k, v in match.items()))

    return pick(slow)["seconds"] / pick(fast)["seconds"]


def markdown_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def emit(benchmark: str, device: str, rows: list[dict], ratios: dict[str, float], out: Path | None) -> dict:
    result = {"benchmark": benchmark, "device": device_name(device), "rows": rows, "ratios": ratios}
    print(f"## {benchmark} on {result['device']}\n")
    print(markdown_table(rows))
    print()
    for name, value in ratios.items():
        print(f"- {name}: {value:.3f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result

"""Where book-keeping's excess goes, layer by layer, inside the private step of the DP benchmark's models (issue 26).

For each layer book-keeping wraps (benchmarks/dpsgd.py's models and CPU batches), the median over the timed steps of
its rule's three parts, timed where they run inside one real ``loss.backward()``:

* ``input_grad_ms``: the op's backward (the input gradient; the non-private step computes the same);
* ``norms_ms``: the per-sample norms (and, where the rule keeps them, the per-sample gradients);
* ``clip_ms``: the clipped sum ``sum_i c_i g_i`` written into ``p.grad``.

Beside them, ``weight_grad_ms``: what the non-private step spends on that layer's parameter gradients, replayed
after the steps on the tensors the last step captured (a Linear's GEMM and bias sum, a convolution's weight- and
bias-gradient op). Normalisation layers form theirs inside the input-gradient kernel, so theirs is ``null`` and
their whole ``norms + clip`` is excess. ``excess_ms = norms_ms + clip_ms - weight_grad_ms``: what the layer adds to
the private step. The sums per layer type and per model are in ``by_kind`` and ``totals``.

    python benchmarks/bk_per_layer.py --threads 1 --out benchmarks/results/cpu/bk_per_layer.json
    python benchmarks/bk_per_layer.py --models mixer --steps 3          # one model, a table on stdout
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # aisec_train from a checkout without installing

import dpsgd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file
from aisec_train.train.allocator import keep_freed_memory  # noqa: E402
from aisec_train.train.bk import BKGradSampleModule  # noqa: E402
from aisec_train.train.bk_conv import ConvRule  # noqa: E402
from aisec_train.train.bk_layers import LinearRule  # noqa: E402

WARMUP_STEPS = 2  # discarded: the first steps grow the allocator and fill the cost model's caches
PARTS = {"backward": "input_grad_ms", "norms": "norms_ms", "clipped": "clip_ms"}


def _timed(fn, times: list[float], captured: dict | None = None):
    def wrapper(module, *args):
        if captured is not None:  # norms(module, params, calls): keep the last step's first call for the replay
            call = args[1][0]
            captured["saved"], captured["grad"] = call.saved, call.grad
        start = time.perf_counter()
        out = fn(module, *args)
        times.append(time.perf_counter() - start)
        return out

    return wrapper


def _weight_grad(rule, module, captured: dict):
    """The non-private step's parameter-gradient op for this layer, on the captured tensors (None: fused)."""
    saved, grad = captured["saved"], captured["grad"]
    if isinstance(rule, LinearRule):
        a, g = saved[0].reshape(-1, saved[0].shape[-1]), grad.reshape(-1, grad.shape[-1])
        return lambda: (g.T @ a, g.sum(0) if module.bias is not None else None)
    if isinstance(rule, ConvRule):
        x, padding = saved
        return lambda: rule._backward(module, x, grad, padding, [False, True, module.bias is not None])
    return None


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def per_layer(key: str, steps: int, quick: bool = False, replays: int = 7) -> dict:
    """One model's per-layer table: ``{"model", "batch", "rows": [...], "by_kind": {...}, "totals": {...}}``."""
    name, channels, size, *_ = dpsgd.MODELS[key]
    batch = dpsgd.batch_size(key, "cpu", quick)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, channels, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    torch.manual_seed(0)
    net = BKGradSampleModule(dpsgd.make_model(name, channels, size), max_grad_norm=1.0)
    times = {layer: {part: [] for part in PARTS} for layer in net.records}
    captured: dict[str, dict] = defaultdict(dict)
    for layer, record in net.records.items():
        rule = record.rule
        for part in PARTS:
            hook = captured[layer] if part == "norms" else None
            setattr(rule, part, _timed(getattr(rule, part), times[layer][part], hook))  # this instance only
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            for lists in times.values():
                for kept in lists.values():
                    kept.clear()  # in place: the wrappers append to these very lists
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
    rows = []
    for layer, record in net.records.items():
        replay = _weight_grad(record.rule, record.module, captured[layer]) if captured[layer] else None
        weight_ms = None
        if replay is not None:
            replay()
            weight_ms = _median_ms([_once(replay) for _ in range(replays)])
        parts = {column: _median_ms(times[layer][part] or [0.0]) for part, column in PARTS.items()}
        row = {"layer": layer, "kind": type(record.module).__name__, "method": record.method, "why": record.why}
        row.update(parts, weight_grad_ms=weight_ms)
        row["excess_ms"] = parts["norms_ms"] + parts["clip_ms"] - (weight_ms or 0.0)
        rows.append(row)
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        for column in (*PARTS.values(), "weight_grad_ms", "excess_ms"):
            by_kind[row["kind"]][column] += row[column] or 0.0
    totals = {c: sum(v[c] for v in by_kind.values()) for c in (*PARTS.values(), "weight_grad_ms", "excess_ms")}
    by_kind = {k: dict(v) for k, v in by_kind.items()}
    return {"model": key, "batch": batch, "steps": steps, "rows": rows, "by_kind": by_kind, "totals": totals}


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table(result: dict) -> str:
    lines = [
        f"## {result['model']} (batch {result['batch']}), ms per step",
        "| layer | kind | method | input grad | norms | clip | non-private weight grad | excess |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        weight = "fused" if r["weight_grad_ms"] is None else f"{r['weight_grad_ms']:.2f}"
        lines.append(
            f"| {r['layer']} | {r['kind']} | {r['method']} | {r['input_grad_ms']:.2f} | {r['norms_ms']:.2f} "
            f"| {r['clip_ms']:.2f} | {weight} | {r['excess_ms']:+.2f} |"
        )
    for kind, v in sorted(result["by_kind"].items(), key=lambda kv: -kv[1]["excess_ms"]):
        lines.append(
            f"| **all {kind}** | | | {v['input_grad_ms']:.1f} | {v['norms_ms']:.1f} | {v['clip_ms']:.1f} "
            f"| {v['weight_grad_ms']:.1f} | {v['excess_ms']:+.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    models = list(dpsgd.MODELS)
    parser.add_argument("--models", default=",".join(models), help=f"comma-separated subset of {models}")
    parser.add_argument("--steps", type=int, default=5, help=f"timed steps (after {WARMUP_STEPS} warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the DP benchmark's verdict runs: 1)")
    parser.add_argument("--quick", action="store_true", help="the DP benchmark's --quick batches (a smoke run)")
    parser.add_argument("--system-malloc", action="store_true", help="malloc's defaults (see benchmarks/dpsgd.py)")
    parser.add_argument("--out", type=output_file, default=None, help="where to write the JSON result")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(models))
    if unknown:
        parser.exit(2, f"bk_per_layer: --models {','.join(unknown)} is not allowed: choose from {','.join(models)}\n")
    for flag, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value < 1:
            parser.exit(2, f"bk_per_layer: {flag}={value} is not allowed: must be >= 1\n")
    torch.set_num_threads(args.threads)
    if not args.system_malloc:
        keep_freed_memory()  # as aisec-train trains, and as benchmarks/dpsgd.py times
    result = {"benchmark": "bk_per_layer", "threads": args.threads, "keep_freed_memory": not args.system_malloc}
    result["load_before"] = os.getloadavg()
    result["models"] = {}
    for key in args.models.split(","):
        result["models"][key] = per_layer(key, args.steps, args.quick)
        print(table(result["models"][key]) + "\n", flush=True)
    result["load_after"] = os.getloadavg()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""What one layer's exact per-sample norms cost on the CPU, against the weight gradient they ride on (issue 26).

Paired micro-benchmarks, each interleaved round by round (order alternating), 1 thread:

* ``linear_seq``: the MLP-Mixer's channel Linear (T=64 positions, 128 -> 256, batch 256). Ghost (Gram norms plus
  one reweighted weight-gradient GEMM, today's pick) against stored per-sample gradients (``bmm``, their norms,
  a weighted reduce), each over the non-private weight gradient alone (what both replace). Book-keeping's
  floor per layer is forward + input gradient + this, against the non-private 3 GEMMs.
* ``conv_mid``: ResNet-18's ``blocks.2.conv2`` (128 -> 128, 3x3, 16x16, batch 64). The folded-group per-sample
  gradients and their norms (today's pick) against the pixel-Gram ghost norm, which costs fewer multiply-adds
  (14.6M against 37.7M per sample) but gathers ``K T^2`` entries.
* ``fold``: the folded-group per-sample weight gradient (``bk_conv._per_sample_grads`` on the CPU) on conv shapes of
  the benchmark's models, in calls of 1, 2, 4, ... samples up to the whole batch, against the batch's own weight
  gradient; ``picked`` is what ``bk_conv.fold_size`` chooses (each call's gradients under ``FOLD_FLOATS`` floats).

    python benchmarks/bk_layer_costs.py --out benchmarks/results/cpu/bk_layer_costs.json
    python benchmarks/bk_layer_costs.py --only fold --out benchmarks/results/cpu/bk_fold.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def paired(fns: dict, rounds: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds + 1):  # round 0 is a discarded warm-up
        for k in order if r % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            fns[k]()
            if r:
                times[k].append(time.perf_counter() - started)
    return times


def linear_seq(rounds: int) -> dict:
    from aisec_kernels.per_sample_norms import ghost_norm_sq

    b, t, da, dg = 256, 64, 128, 256
    a, g, w = torch.randn(b, t, da), torch.randn(b, t, dg), torch.rand(b)

    def ghost():
        return ghost_norm_sq(a, g), (g * w[:, None, None]).flatten(0, 1).T @ a.flatten(0, 1)

    def stored():
        ps = torch.bmm(g.transpose(1, 2), a)
        return torch.linalg.vector_norm(ps.flatten(1), dim=1).square(), w @ ps.flatten(1)

    def plain():
        return g.flatten(0, 1).T @ a.flatten(0, 1)

    times = paired({"ghost": ghost, "stored": stored, "plain": plain}, rounds)
    return _summary(times, "plain", {"T": t, "Da": da, "Dg": dg, "batch": b})


def conv_mid(rounds: int) -> dict:
    from aisec_train.train.bk_conv import ConvRule

    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False)
    part = [(torch.randn(64, 128, 16, 16), [1, 1], torch.randn(64, 128, 16, 16))]
    rule = ConvRule()

    def folded():
        return rule._per_sample_grads(conv, part).flatten(1).square().sum(1)

    def pixels():
        return rule._pixel_ghost(conv, part)

    gap = ((folded() - pixels()).abs() / folded()).max().item()
    times = paired({"folded": folded, "pixels": pixels}, rounds)
    return _summary(times, "folded", {"T": 256, "Da": 1152, "Dg": 128, "batch": 64, "max_rel_gap": gap})


# (name, batch, in channels, out channels, input side, kernel, stride): cnn 32x32's conv2 and ResNet-18's stages
FOLD_SHAPES = [
    ("cnn_32.conv2", 256, 32, 64, 16, 3, 1),
    ("resnet18_gn.blocks.0.conv1", 64, 64, 64, 32, 3, 1),
    ("resnet18_gn.blocks.2.conv1", 64, 64, 128, 32, 3, 2),
    ("resnet18_gn.blocks.2.conv2", 64, 128, 128, 16, 3, 1),
    ("resnet18_gn.blocks.4.conv2", 64, 256, 256, 8, 3, 1),
]


def fold(rounds: int) -> dict:
    from aisec_train.train.bk_conv import ConvRule, fold_size

    out = {}
    for name, b, cin, cout, side, k, stride in FOLD_SHAPES:
        conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)
        x = torch.randn(b, cin, side, side)
        g = torch.randn(b, cout, (side + 2 * (k // 2) - k) // stride + 1, (side + 2 * (k // 2) - k) // stride + 1)
        pad = list(conv.padding)

        def batch_grad(x=x, g=g, conv=conv, pad=pad):
            return ConvRule._backward(conv, x, g, pad, [False, True, False])[1]

        fns = {"batch": batch_grad}
        sizes = sorted({min(b, 1 << i) for i in range(b.bit_length() + 1)})
        for n in sizes:

            def calls(n=n, x=x, g=g, conv=conv, pad=pad):
                rule, starts = ConvRule(), range(0, len(x), n)
                return [rule._per_sample_grads(conv, [(x[lo : lo + n], pad, g[lo : lo + n])]) for lo in starts]

            fns[f"fold_{n}"] = calls
        times = paired(fns, rounds)
        summary = _summary(times, "batch", {"batch": b, "in": cin, "out": cout, "side": side, "kernel": k})
        summary["picked"] = fold_size(cin * k * k * cout)
        out[name] = summary
    return out


def _summary(times: dict, base: str, info: dict) -> dict:
    out = {**info, "seconds": {k: statistics.median(v) for k, v in times.items()}, "times": times}
    out["over_" + base] = {
        k: statistics.median(p / q for p, q in zip(v, times[base], strict=True)) for k, v in times.items() if k != base
    }
    return out


TABLES = {"linear_seq": linear_seq, "conv_mid": conv_mid, "fold": fold}


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=output_file, default=None)
    parser.add_argument("--only", nargs="+", choices=sorted(TABLES), default=list(TABLES), help="tables to run")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.exit(2, f"bk_layer_costs: --rounds {args.rounds}: allowed >= 1\n")
    torch.set_num_threads(1)
    result = {"threads": 1, "rounds": args.rounds, "load_before": os.getloadavg()}
    for name in args.only:
        result[name] = TABLES[name](args.rounds)
        tables = result[name].items() if name == "fold" else [(name, result[name])]
        for label, table in tables:
            over = next(v for k, v in table.items() if k.startswith("over_"))
            picked = f" picked fold_{table['picked']}" if "picked" in table else ""
            print(label, {k: round(v, 3) for k, v in over.items()}, picked)
    result["load_after"] = os.getloadavg()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

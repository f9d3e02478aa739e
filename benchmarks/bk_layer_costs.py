"""What one layer's exact per-sample norms cost on the CPU, against the weight gradient they ride on (issue 26).

Two paired micro-benchmarks, each interleaved round by round (order alternating), 1 thread:

* ``linear_seq``: the MLP-Mixer's channel Linear (T=64 positions, 128 -> 256, batch 256). Ghost (Gram norms plus
  one reweighted weight-gradient GEMM, today's pick) against stored per-sample gradients (``bmm``, their norms,
  a weighted reduce), each over the non-private weight gradient alone (what both replace). Book-keeping's
  floor per layer is forward + input gradient + this, against the non-private 3 GEMMs.
* ``conv_mid``: ResNet-18's ``blocks.2.conv2`` (128 -> 128, 3x3, 16x16, batch 64). The folded-group per-sample
  gradients and their norms (today's pick) against the pixel-Gram ghost norm, which costs fewer multiply-adds
  (14.6M against 37.7M per sample) but gathers ``K T^2`` entries.

    python benchmarks/bk_layer_costs.py --out benchmarks/results/cpu/bk_layer_costs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

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


def _summary(times: dict, base: str, info: dict) -> dict:
    out = {**info, "seconds": {k: statistics.median(v) for k, v in times.items()}, "times": times}
    out["over_" + base] = {
        k: statistics.median(p / q for p, q in zip(v, times[base], strict=True)) for k, v in times.items() if k != base
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.exit(2, f"bk_layer_costs: --rounds {args.rounds}: allowed >= 1\n")
    torch.set_num_threads(1)
    result = {"threads": 1, "rounds": args.rounds, "load_before": os.getloadavg()}
    result |= {"linear_seq": linear_seq(args.rounds), "conv_mid": conv_mid(args.rounds), "load_after": os.getloadavg()}
    for name in ("linear_seq", "conv_mid"):
        over = next(v for k, v in result[name].items() if k.startswith("over_"))
        print(name, {k: round(v, 3) for k, v in over.items()})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Per-channel activation statistics (the Fine-Pruning input): Triton kernel vs its torch reference.

Times ``channel_stats`` on a (N, C, H, W) float32 feature map, with achieved GB/s counting one read of the
map. On CUDA the ratio ``triton_vs_torch`` compares the two; on the CPU only the torch reference is timed,
and the Triton kernel is checked against it under ``TRITON_INTERPRET=1`` on a small map (speed is judged on
a GPU only).

    python benchmarks/activations.py --quick --out activations.json
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from aisec_kernels.channel_stats import channel_stats_reference, channel_stats_triton
from common import emit, parse_args, ratio, time_it

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3 peak of the H100 SXM

_INTERPRETED_CHECK = """
import torch
from aisec_kernels.channel_stats import channel_stats_reference, channel_stats_triton
f = torch.randn(5, 7, 9, 11).transpose(2, 3)
a, b = channel_stats_triton(f), channel_stats_reference(f)
assert a.count == b.count and torch.equal(a.count_positive, b.count_positive) and torch.equal(a.max, b.max)
torch.testing.assert_close(a.sum, b.sum, atol=1e-4, rtol=1e-5)
torch.testing.assert_close(a.sum_sq, b.sum_sq, atol=1e-4, rtol=1e-5)
"""


def interpreted_check() -> bool:
    """The Triton kernel equals the reference in Triton's CPU interpreter (set before triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECK], env=env, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    return done.returncode == 0


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    cuda = args.device.startswith("cuda")
    n, c, hw = (64, 64, 16) if args.quick else (512, 256, 32)
    feat = torch.randn(n, c, hw, hw, device=args.device)
    impls = {"channel_stats_torch": lambda: channel_stats_reference(feat)}
    if cuda:
        impls["channel_stats_triton"] = lambda: channel_stats_triton(feat)
    inner = 20 if cuda else 1  # back-to-back calls per sync on a GPU: kernel time, not launch latency
    rows = []
    for impl, fn in impls.items():
        seconds = time_it(lambda fn=fn: [fn() for _ in range(inner)], args.device, repeats=5 if args.quick else 20)
        seconds /= inner
        row = dict(impl=impl, shape=f"{n}x{c}x{hw}x{hw}", seconds=seconds)
        row["gb_per_s"] = feat.numel() * feat.element_size() / seconds / 1e9
        if cuda:
            row["fraction_of_h100_peak"] = row["gb_per_s"] * 1e9 / H100_BANDWIDTH
        rows.append(row)
    ratios = {"triton_vs_torch": ratio(rows, "channel_stats_triton", "channel_stats_torch")} if cuda else {}
    if not cuda:
        rows.append(dict(impl="channel_stats_triton_interpreted_check", seconds=0.0, equal=interpreted_check()))
    emit("activations", args.device, rows, ratios, args.out)


if __name__ == "__main__":
    main()

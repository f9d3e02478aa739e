"""Per-channel activation statistics (the Fine-Pruning input) and the whole Fine-Pruning stage, timed.

Rows:

- ``channel_stats_torch`` / ``channel_stats_triton``: the kernel on a (N, C, H, W) float32 feature map, with the
  achieved GB/s counting one read of the map (and the fraction of the H100's peak on CUDA). On the CPU only the
  torch reference is timed, and the Triton kernel is checked against it under ``TRITON_INTERPRET=1``
  (``channel_stats_triton_interpreted_check``); speed is judged on a GPU only.
- ``fine_pruning_stage_<backend>``: the repair as the pipeline runs it (``prune.fine_prune``: feature cache,
  channel ranking by the kernel, the pruning curve on three splits, masked fine-tuning through the one training
  loop, the verified bake) on the automatically found feature layer of the small CNN preset, trained for a few
  epochs on BadNets-poisoned digits (a dataset view), with the default ``backdoor=badnets`` settings
  (``--quick``: 5 fine-tuning epochs instead of 30, one timed run).
  ``ranking_share`` is the kernel's share of the stage: the stage is bound by fine-tuning, not by statistics.

Ratios: ``triton_vs_torch`` (kernel, CUDA only), ``fine_pruning_triton_vs_torch`` (stage, CUDA only).

    python benchmarks/activations.py --quick --out activations.json
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import torch
from aisec_kernels.channel_stats import channel_stats_reference, channel_stats_triton
from common import emit, parse_args, ratio, time_it

from aisec_train.backdoor import badnets, prune, trusted
from aisec_train.backdoor.config import BackdoorConfig
from aisec_train.backdoor.features import FeatureCache
from aisec_train.backdoor.layers import find_feature_layer
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.models import ModelFactory
from aisec_train.train.config import TrainConfig
from aisec_train.train.loop import train

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


def kernel_rows(device: str, quick: bool) -> list[dict]:
    cuda = device.startswith("cuda")
    n, c, hw = (64, 64, 16) if quick else (512, 256, 32)
    feat = torch.randn(n, c, hw, hw, device=device)
    impls = {"channel_stats_torch": lambda: channel_stats_reference(feat)}
    if cuda:
        impls["channel_stats_triton"] = lambda: channel_stats_triton(feat)
    inner = 20 if cuda else 1  # back-to-back calls per sync on a GPU: kernel time, not launch latency
    rows = []
    for impl, fn in impls.items():
        seconds = time_it(lambda fn=fn: [fn() for _ in range(inner)], device, repeats=5 if quick else 20) / inner
        row = dict(impl=impl, shape=f"{n}x{c}x{hw}x{hw}", seconds=seconds)
        row["gb_per_s"] = feat.numel() * feat.element_size() / seconds / 1e9
        if cuda:
            row["fraction_of_h100_peak"] = row["gb_per_s"] * 1e9 / H100_BANDWIDTH
        rows.append(row)
    if not cuda:
        rows.append(dict(impl="channel_stats_triton_interpreted_check", seconds=0.0, equal=interpreted_check()))
    return rows


def stage_rows(device: str, quick: bool) -> list[dict]:
    """Train a small backdoored CNN once, then time the Fine-Pruning stage on copies of it, per backend."""
    dev = torch.device(device)
    data = load_dataset(DatasetConfig(), seed=0)
    kept, clean = trusted.carve_reserve(data.train, 0.2, seed=0)
    cfg = BackdoorConfig(finetune_epochs=5) if quick else BackdoorConfig()  # quick: the contract's minute
    trigger = badnets.Trigger(cfg.patch_size, cfg.patch_position.value, cfg.patch_value)
    poisoned = badnets.poison(kept, rate=cfg.rate, trigger=trigger, target_of=badnets.all_to_one(0), seed=0)
    attack, _ = badnets.triggered(data.test, trigger, badnets.all_to_one(0))
    factory = ModelFactory({"_target_": "aisec_train.models.SmallCNN"}, data.input_shape, data.num_classes)
    model = factory(seed=0)
    path = find_feature_layer(model, data.input_shape)
    train_cfg = TrainConfig(epochs=3 if quick else 10, lr=0.1, batch_size=64, ema_decay=0.0)
    model = train(model, poisoned.view, train_cfg=train_cfg, device=dev, progress=False).model
    evaluate = {"test_accuracy": data.test, "asr": attack}
    backends = ["torch", "triton"] if dev.type == "cuda" else ["torch"]
    maps = FeatureCache.build(model, path, clean, dev).maps
    rows = []
    for backend in backends:
        stage = time_it(
            lambda b=backend: prune.fine_prune(
                copy.deepcopy(model), path, clean, dev, cfg, evaluate=evaluate, backend=b
            ),
            device,
            repeats=1 if quick else 5,
            warmup=0 if quick else 1,
        )
        ranking = time_it(lambda b=backend: prune.rank_channels(maps, b), device, repeats=5)
        rows.append(
            dict(
                impl=f"fine_pruning_stage_{backend}",
                shape=f"{len(clean)} trusted, {maps.shape[1]} channels, {cfg.finetune_epochs} fine-tune epochs",
                seconds=stage,
                ranking_seconds=ranking,
                ranking_share=ranking / stage,
            )
        )
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rows = kernel_rows(args.device, args.quick) + stage_rows(args.device, args.quick)
    ratios = {}
    if args.device.startswith("cuda"):
        ratios["triton_vs_torch"] = ratio(rows, "channel_stats_triton", "channel_stats_torch")
        ratios["fine_pruning_triton_vs_torch"] = ratio(rows, "fine_pruning_stage_triton", "fine_pruning_stage_torch")
    emit("activations", args.device, rows, ratios, args.out)


if __name__ == "__main__":
    main()

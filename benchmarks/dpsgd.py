"""DP-SGD cost: step time and peak memory of non-private SGD, Opacus hooks, Opacus ghost and aisec-train's
default DP path (Opacus ghost clipping + weight averaging, through ``aisec_train.train.privacy``).

    python benchmarks/dpsgd.py --quick --out dpsgd.json

Each (model, impl) runs in a fresh subprocess so its peak memory is its own: CUDA peak allocated bytes on a
GPU, peak resident set size (RSS) growth over the idle process on the CPU. Batches are fixed-size (no
Poisson sampling) so every implementation does the same work per step.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from common import emit, parse_args, time_it
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IMPLS = ["nonprivate", "opacus_hooks", "opacus_ghost", "ours"]
MODELS = {  # name -> (model, channels, image size, batch, batch in --quick)
    "cnn": ("cnn", 1, 8, 512, 512),
    "resnet18_gn": ("resnet18_gn", 3, 32, 64, 8),
}


def build_step(impl: str, model_name: str, device: str, quick: bool):
    from aisec_train.config import GradSampleMode, PrivacyConfig
    from aisec_train.models import build_model
    from aisec_train.train.averaging import WeightAverage
    from aisec_train.train.ledger import PrivacyLedger
    from aisec_train.train.privacy import make_private

    name, channels, size, batch, quick_batch = MODELS[model_name]
    batch = quick_batch if quick else batch
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes=10, image_size=size).to(device)
    x = torch.rand(batch * 4, channels, size, size)
    y = torch.randint(0, 10, (batch * 4,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion: nn.Module = nn.CrossEntropyLoss()
    average = None
    if impl != "nonprivate":
        mode = GradSampleMode.hooks if impl == "opacus_hooks" else GradSampleMode.ghost
        cfg = PrivacyConfig(noise_multiplier=1.0, grad_sample_mode=mode, poisson_sampling=False)
        dp = make_private(model, optimizer, loader, cfg, ledger=PrivacyLedger("prv", 1e-5), epochs=1)
        model, optimizer, criterion = dp.model, dp.optimizer, dp.criterion
        if impl == "ours":
            average = WeightAverage(dp.model._module, 0.9)
    xb, yb = x[:batch].to(device), y[:batch].to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update(model._module)

    return step, batch


def child(impl: str, model_name: str, device: str, quick: bool) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, batch = build_step(impl, model_name, device, quick)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = time_it(step, device, repeats=3 if quick else 10, warmup=2)
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    print(json.dumps({"impl": impl, "model": model_name, "batch": batch, "seconds": seconds, "peak_mb": peak_mb}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, impl, model_name, device, quick = sys.argv
        child(impl, model_name, device, quick == "1")
        return
    args = parse_args(__doc__.splitlines()[0])
    rows = []
    for model_name in MODELS:
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--child", impl, model_name, args.device, "1" if args.quick else "0"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["steps_per_s"] = 1.0 / row["seconds"]
            rows.append(row)
    ratios = {}
    for model_name in MODELS:
        pick = {r["impl"]: r for r in rows if r["model"] == model_name}
        # X_vs_Y = Y's time / X's time. nonprivate_vs_ours is the DP slowdown (target <= 1.3).
        ratios[f"nonprivate_vs_ours_{model_name}"] = pick["ours"]["seconds"] / pick["nonprivate"]["seconds"]
        ratios[f"ours_vs_opacus_hooks_{model_name}"] = pick["opacus_hooks"]["seconds"] / pick["ours"]["seconds"]
        ratios[f"opacus_ghost_vs_opacus_hooks_{model_name}"] = (
            pick["opacus_hooks"]["seconds"] / pick["opacus_ghost"]["seconds"]
        )
    emit("dpsgd_step", args.device, rows, ratios, args.out)


if __name__ == "__main__":
    main()

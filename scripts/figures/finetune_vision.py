"""DP fine-tuning figure (issue 23): public pretraining, then private fine-tuning at epsilon 8.

scikit-learn's digits are split by class: 0-4 are the "public" set (a SmallCNN is pretrained on them without DP),
5-9 the "private" one (relabelled 0-4). On the private classes, at the same epsilon, we compare DP fine-tuning of
the head only, LoRA adapters (plus head), the full network, and training from scratch; each variant runs in its
own process so its peak resident memory is its own. Writes benchmarks/results/cpu/finetune_vision.json.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/figures/finetune_vision.py --epochs 15 --seeds 0 1 2
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "benchmarks" / "results" / "cpu" / "finetune_vision.json"
VARIANTS = {"head": "head", "lora": "lora", "full": "all", "scratch": "all"}


def split(seed: int):
    """(public train, private train, private test) as float tensors in [0, 1], labels 0-4 in each half."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    public, private = y < 5, y >= 5
    xp, yp = x[private], y[private] - 5
    cut = int(0.8 * len(yp))
    return (x[public], y[public]), (xp[:cut], yp[:cut]), (xp[cut:], yp[cut:])


def pretrain(path: Path, seed: int, epochs: int) -> float:
    import aisec_train
    from aisec_train.models import SmallCNN
    from aisec_train.train.loop import accuracy, train

    (xs, ys), _, _ = split(seed)
    cfg = aisec_train.compose(["privacy=none", f"train.epochs={epochs}", "train.batch_size=64", f"train.seed={seed}",
                               "train.ema_decay=0"])  # fmt: skip
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, num_classes=5, image_size=8)
    result = train(model, TensorDataset(xs, ys), train_cfg=cfg.train, privacy_cfg=cfg.privacy,
                   device=torch.device("cpu"), progress=False)  # fmt: skip
    torch.save(result.model.state_dict(), path)
    return accuracy(result.model, TensorDataset(xs, ys), torch.device("cpu"))


def fine_tune(variant: str, checkpoint: str, seed: int, epochs: int, epsilon: float, queue) -> None:
    import aisec_train
    from aisec_train.models import ModelFactory
    from aisec_train.privacy.engine import quiet_known_warnings
    from aisec_train.train.loop import accuracy, train

    quiet_known_warnings()
    _, (xt, yt), (xe, ye) = split(seed)
    spec = {"_target_": "aisec_train.models.SmallCNN", "trainable": VARIANTS[variant], "lora": {"r": 4, "alpha": 8}}
    if variant != "scratch":
        spec["checkpoint_path"] = checkpoint
    factory = ModelFactory(spec, (1, 8, 8), 5, private=True)
    model = factory(seed=seed)
    counts = factory._tuned
    cfg = aisec_train.compose([f"train.epochs={epochs}", "train.batch_size=128", f"train.seed={seed}",
                               f"privacy.target_epsilon={epsilon}"])  # fmt: skip
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = train(model, TensorDataset(xt, yt), train_cfg=cfg.train, privacy_cfg=cfg.privacy,
                   device=torch.device("cpu"), progress=False)  # fmt: skip
    seconds = time.perf_counter() - started
    queue.put({
        "variant": variant, "seed": seed,
        "accuracy": accuracy(result.model, TensorDataset(xe, ye), torch.device("cpu")),
        "epsilon": result.ledger.epsilon(), "steps": result.ledger.steps,
        "train_seconds": round(seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1),
        "trainable_parameters": counts["trainable_parameters"], "total_parameters": counts["total_parameters"],
    })  # fmt: skip


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=output_file, default=OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    ctx = mp.get_context("spawn")
    rows, pretrained = [], {}
    work = Path("/tmp") / f"aisec_finetune_vision_{time.time_ns()}"
    work.mkdir(parents=True)
    for seed in args.seeds:
        ckpt = work / f"public_{seed}.pt"
        pretrained[seed] = pretrain(ckpt, seed, args.pretrain_epochs)
        for variant in VARIANTS:
            queue = ctx.Queue()
            proc = ctx.Process(target=fine_tune, args=(variant, str(ckpt), seed, args.epochs, args.epsilon, queue))
            proc.start()
            row = queue.get()
            proc.join()
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for variant in VARIANTS:
        acc = [r["accuracy"] for r in rows if r["variant"] == variant]
        secs = [r["train_seconds"] for r in rows if r["variant"] == variant]
        summary[variant] = {"accuracy_mean": statistics.mean(acc), "accuracy_min": min(acc), "accuracy_max": max(acc),
                            "train_seconds_median": statistics.median(secs)}  # fmt: skip
    result = {
        "what": "digits: SmallCNN pretrained without DP on classes 0-4, DP fine-tuned on classes 5-9 at epsilon "
        f"{args.epsilon} (head only, LoRA r=4 + head, full) vs trained from scratch at the same epsilon",
        "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs, "seeds": args.seeds,
        "public_train_accuracy": pretrained, "summary": summary, "rows": rows,
        "note": "CPU, shared machine: wall times are noisy; peak RSS includes the interpreter and torch",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Issue 20's secret-noise figures: identical DP runs release different models, and a replay cannot recompute one.

    .venv/bin/python scripts/figures/secret_noise.py [--pairs 10] [--epochs 1] [--out PATH]

1. ``--pairs`` pairs of identical DP runs of the default job (digits, ``train.epochs=EPOCHS``, audits off) through
   the Python API, each run with its own ledger store and registry (``common.own_stores``): every model digest
   differs from every other.
2. A replay: an adversary who knows the seed, the config and every training record re-runs the released job. With
   OS-entropy noise the replay does not reproduce the released model; with ``privacy.reproducible_noise=true`` (the
   debug override, which claims no guarantee) it does, bit for bit. The same at the loop level as a membership
   test: replaying with and without one target record decides membership only when the noise follows the seed.
3. The cost of drawing the noise from a private, OS-seeded generator instead of torch's global one, and of Opacus'
   secure-mode sum of four draws, measured in this process (interleaved, medians).

Writes benchmarks/results/cpu/secret_noise.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import own_stores, write  # noqa: E402

import aisec_train  # noqa: E402
from aisec_train.data.config import DatasetConfig  # noqa: E402
from aisec_train.data.dataset import load_dataset  # noqa: E402
from aisec_train.data.views import subset  # noqa: E402
from aisec_train.errors import RefusingParser
from aisec_train.models import build_model  # noqa: E402
from aisec_train.preflight import output_file
from aisec_train.privacy.randomness import secret_generator  # noqa: E402
from aisec_train.train.config import PrivacyConfig, TrainConfig  # noqa: E402
from aisec_train.train.loop import train  # noqa: E402

QUICK = ["audit=off", "robustness.evaluate=false"]


def api_run(overrides: list[str], run_dir: Path) -> str:
    """One pipeline run with its own ledger store and registry; the released model.pt's SHA-256."""
    saved = dict(os.environ)
    os.environ.update(own_stores(run_dir, always=True))
    try:
        return aisec_train.run(overrides, run_dir=run_dir).get("model.sha256")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def pairs(n: int, epochs: int, root: Path) -> dict:
    overrides = [f"train.epochs={epochs}", *QUICK]
    digests = [[api_run(overrides, root / f"pair{i}-{j}") for j in (0, 1)] for i in range(n)]
    flat = [d for pair in digests for d in pair]
    return {
        "overrides": overrides,
        "pairs": n,
        "digests": digests,
        "pairs_that_differ": sum(a != b for a, b in digests),
        "distinct_digests": len(set(flat)),
        "runs": len(flat),
    }


def pipeline_replay(epochs: int, root: Path) -> dict:
    """The released job and an adversary's re-run of it (same seed, config, data), with and without the override."""
    out = {}
    for name, extra in (("os_entropy", []), ("reproducible_noise", ["privacy.reproducible_noise=true"])):
        overrides = [f"train.epochs={epochs}", *QUICK, *extra]
        released = api_run(overrides, root / f"released-{name}")
        replayed = api_run(overrides, root / f"replay-{name}")
        out[name] = {"released": released, "replayed": replayed, "replay_reproduces_release": released == replayed}
    return out


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode() + value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fit(data, reproducible: bool, epochs: int) -> str:
    torch.manual_seed(0)  # the public initial weights, as the model factory seeds them
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    cfg = TrainConfig(epochs=epochs, batch_size=256, max_physical_batch_size=256, lr=0.5, seed=0)
    privacy = PrivacyConfig(target_epsilon=3.0, reproducible_noise=reproducible)
    return _digest(
        train(model, data, train_cfg=cfg, privacy_cfg=privacy, device=torch.device("cpu"), progress=False).model
    )


def membership_replay(epochs: int, target: int = 0) -> dict:
    """The attack the secret noise defeats: replay training with and without a target record, compare digests."""
    data = load_dataset(DatasetConfig(name="digits"), seed=0).train
    without = subset(data, [i for i in range(len(data)) if i != target])
    out = {}
    for name, reproducible in (("os_entropy", False), ("reproducible_noise", True)):
        released = _fit(data, reproducible, epochs)  # the target is a member
        with_t, without_t = _fit(data, reproducible, epochs), _fit(without, reproducible, epochs)
        decided = (released == with_t) != (released == without_t)
        out[name] = {"replay_with_target_matches": released == with_t,
                     "replay_without_target_matches": released == without_t, "membership_decided": decided}  # fmt: skip
    return {"n_train": len(data), "target_index": target, "epochs": epochs, **out}


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def noise_cost(sizes: tuple[int, ...] = (10_000, 1_000_000, 10_000_000), repeats: int = 15) -> dict:
    """Seconds per draw of N(0, 1) of each size: global generator, private OS-seeded generator, and Opacus'
    secure-mode sum of four draws (plus one discarded) from the private one. Interleaved so load hits all alike."""
    private = secret_generator()
    rows = []
    for size in sizes:
        kinds = {
            "global": lambda n=size: torch.normal(0.0, 1.0, (n,)),
            "private": lambda n=size: torch.normal(0.0, 1.0, (n,), generator=private),
            "private_secure_sum": lambda n=size: _secure(n, private),
        }
        medians = {k: [] for k in kinds}
        for _ in range(3):  # three interleaved rounds
            for name, fn in kinds.items():
                medians[name].append(_median_seconds(fn, repeats))
        row = {"numel": size, **{f"{k}_s": min(v) for k, v in medians.items()}}
        row["private_over_global"] = row["private_s"] / row["global_s"]
        row["secure_sum_over_global"] = row["private_secure_sum_s"] / row["global_s"]
        rows.append(row)
    setup = _median_seconds(secret_generator, 50)
    return {"per_draw": rows, "secret_generator_setup_s": setup, "threads": torch.get_num_threads()}


def _secure(size: int, generator: torch.Generator) -> torch.Tensor:
    """What Opacus' _generate_noise does with secure_mode on (one discarded draw, the sum of four, halved)."""
    torch.normal(0.0, 1.0, (1, 1), generator=generator)
    total = torch.zeros(size)
    for _ in range(4):
        total += torch.normal(0.0, 1.0, (size,), generator=generator)
    return total / 2


def main() -> None:
    parser = RefusingParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=output_file, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="secret_noise-") as tmp:
        root = Path(tmp)
        result = {
            "identical_pairs": pairs(args.pairs, args.epochs, root),
            "replay": pipeline_replay(args.epochs, root),
            "membership_replay": membership_replay(args.epochs),
            "noise_cost": noise_cost(),
        }
    result["wall_s"] = time.perf_counter() - started
    result["note"] = "CPU shared with other jobs while measured: timings are noisy; ratios are from one process"
    print(write("secret_noise", result, args.out))


if __name__ == "__main__":
    main()

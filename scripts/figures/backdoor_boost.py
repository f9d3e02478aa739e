"""A boosted (model-replacement) malicious client against the federated defences, measured in-process.

FedAvg rounds are run in this process with the project's own pieces, not the Flower simulation (Ray did not start
on the loaded 2-core machine: "the current node timed out during startup"): the poison stage's client partition
and poisoned shards (``backdoor.stage.poison_data``), each client's local training through the one loop, the
malicious client's update through ``federated_poison.boost`` (what the ClientApp calls), and the server step
through ``federated.robust_aggregation.aggregate`` (Flower's own aggregation functions). Non-private, digits,
``federated.clients=5``, one malicious client holding ``backdoor.rate=0.3`` of its shard poisoned.

    OMP_NUM_THREADS=1 python scripts/figures/backdoor_boost.py --rounds 3 --local-epochs 2
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from aisec_train.backdoor import badnets, federated_poison
from aisec_train.backdoor.metrics import measure
from aisec_train.backdoor.stage import poison_data
from aisec_train.cli import CONFIG_DIR
from aisec_train.config import register_configs, to_config
from aisec_train.data.dataset import load_dataset
from aisec_train.data.views import subset
from aisec_train.errors import RefusingParser
from aisec_train.federated.robust_aggregation import aggregate
from aisec_train.models import ModelFactory
from aisec_train.preflight import output_file
from aisec_train.train.config import TrainConfig
from aisec_train.train.loop import train

REPO = Path(__file__).resolve().parents[2]
DEFENCES = ("fedavg", "norm_bound", "median", "trimmed_mean", "krum")
CPU = torch.device("cpu")


def _cfg(boost: str, clients: int):
    register_configs()
    overrides = ["experiment=backdoor", "federated=fedavg", "privacy=none", "backdoor.malicious_clients=1",
                 "backdoor.rate=0.3", f"backdoor.boost={boost}", f"federated.clients={clients}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


def _flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().astype(np.float64)


def _load(model: torch.nn.Module, vector: np.ndarray) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.as_tensor(vector[offset : offset + p.numel()]).view_as(p))
            offset += p.numel()


def run(boost: str, defence: str, args) -> dict:
    cfg = _cfg(boost, args.clients)
    data = load_dataset(cfg.dataset, seed=cfg.train.seed)
    factory = ModelFactory(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes)
    state = poison_data(cfg, data, factory)
    model = factory(seed=cfg.train.seed)
    local = TrainConfig(epochs=args.local_epochs, batch_size=64, max_physical_batch_size=64, lr=0.1, ema_decay=0.0)
    attack, truth = badnets.triggered(data.test, state.trigger, state.target_of)
    for rnd in range(args.rounds):
        start, deltas, weights = _flat(model), [], []
        for pid, rows in enumerate(state.client_indices):
            client = factory(seed=cfg.train.seed)
            _load(client, start)
            local_cfg = TrainConfig(**{**local.__dict__, "seed": cfg.train.seed + 1000 * rnd + pid})
            train(client, subset(data.train, rows), train_cfg=local_cfg, device=CPU, progress=False)
            deltas.append(federated_poison.boost(_flat(client) - start, pid, cfg))
            weights.append(len(rows))
        d = cfg.federated.defence
        step = aggregate(defence, deltas, weights, num_malicious=1, trim_fraction=d.trim_fraction,
                         norm_bound=d.norm_bound)  # fmt: skip
        _load(model, start + step)
    m = measure(model, data.test, attack, truth, CPU)
    return {"boost": boost, "boost_factor": federated_poison.boost_factor(cfg), "defence": defence,
            "asr": m.asr, "clean_accuracy": m.clean_accuracy,
            "malicious_update_norm_last_round": float(np.linalg.norm(deltas[0])),
            "honest_update_norm_last_round": float(np.median([np.linalg.norm(u) for u in deltas[1:]]))}  # fmt: skip


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--clients", type=int, default=5, help="Krum needs >= 2f + 3 = 5 with one attacker")
    parser.add_argument("--defences", nargs="+", choices=DEFENCES, default=list(DEFENCES))
    parser.add_argument(
        "--out", type=output_file, default=REPO / "benchmarks" / "results" / "cpu" / "backdoor_boost.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, started = [], time.perf_counter()
    for defence in args.defences:
        for boost in ("1", "auto"):
            rows.append(run(boost, defence, args))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    result = {"benchmark": "backdoor_boost", "device": f"cpu ({platform.machine()}), shared and loaded",
              "settings": vars(args) | {"out": str(args.out)}, "rows": rows, "ratios": {},
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

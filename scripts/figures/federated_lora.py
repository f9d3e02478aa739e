"""Federated fine-tuning figure (issue 23, item 4): bytes per round with only the trainable set travelling.

A SmallCNN "pretrained" checkpoint (10 digit classes, seeded weights) is fine-tuned federated on digits with
``model.trainable`` = all (the whole model travels), head and LoRA (r=2). For each, and for plaintext FedAvg and
CKKS (4096-degree ring), one real round: the real ClientApp (DP-SGD, epsilon 8) answers the strategy's messages
for every client, the real strategy aggregates. Bytes are the clients' measured ``upload-bytes`` (what each
client put in its reply); the server sends the same subset back, so downloads shrink by the same factor.
No engine (Ray) is started: the engine moves the same messages. Writes benchmarks/results/cpu/federated_lora.json.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/figures/federated_lora.py --clients 2
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from aisec_train.errors import RefusingParser

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "benchmarks" / "results" / "cpu" / "federated_lora.json"
sys.path.insert(0, str(REPO))


class Nodes:
    def __init__(self, n: int) -> None:
        self.ids = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.ids


def one_round(folder: Path, checkpoint: Path, trainable: str, aggregation: str, clients: int) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    import aisec_train
    from aisec_train.crypto import CkksParams, generate_keys
    from aisec_train.federated import client_app
    from aisec_train.federated.settings import ClientSettings
    from aisec_train.federated.strategy import SecureFedAvg
    from aisec_train.federated.task import FederatedTask, write_job

    folder.mkdir(parents=True)
    cfg = aisec_train.compose(["federated=fedavg", f"federated.clients={clients}", "federated.local_epochs=1",
                               f"model.trainable={trainable}", f"model.checkpoint_path={checkpoint}",
                               "model.lora.r=2", "privacy.target_epsilon=8"])  # fmt: skip
    task = FederatedTask.from_job(str(write_job(cfg, folder / "job.json", manifest_sha256="figure")))
    settings = ClientSettings(job=str(folder / "job.json"), state_dir=str(folder / "clients"))
    server = {}
    if aggregation == "ckks":
        keys = generate_keys(CkksParams(), folder / "client_keys", folder / "server")
        settings = ClientSettings(settings.job, settings.state_dir, str(keys.secret_context), keys.secret_sha256)
        server = {"public_context": str(keys.public_context), "public_sha256": keys.public_sha256}
    strategy = SecureFedAvg(aggregation=aggregation, min_clients=clients, max_update_norm=1e6,
                            state_dir=folder / "server", **server)  # fmt: skip
    app = client_app.make_app(settings, task)
    started = time.perf_counter()
    msgs = list(strategy.configure_train(1, ArrayRecord(task.global_state()), ConfigRecord({}), Nodes(clients)))
    replies = []
    for pid, msg in enumerate(msgs):
        ctx = Context(run_id=7, node_id=pid + 1, node_config={"partition-id": pid}, state=RecordDict(), run_config={})
        replies.append(app(msg, ctx))
    arrays, _ = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - started
    uploads = [int(r.content["metrics"]["upload-bytes"]) for r in replies]
    assert arrays is not None and all(uploads), "the round was not aggregated"
    model = task.initial_model()
    return {
        "trainable": trainable,
        "aggregation": aggregation,
        "values_sent_per_client": sum(v.numel() for v in task.global_state().values()),
        "total_parameters": sum(v.numel() for v in model.state_dict().values()),
        "upload_bytes_per_client": uploads,
        "bytes_per_round": sum(uploads),
        "round_s": round(seconds, 2),
        "encrypt_s": [round(float(r.content["metrics"]["encrypt-s"]), 3) for r in replies],
    }


def main() -> None:
    parser = RefusingParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    from aisec_train.models import SmallCNN

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1  # what a ServerApp process sets
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("AISEC_TRAIN_LEDGER_STORE", str(Path(tmp) / "ledgers"))  # no spend on the user's store
        torch.manual_seed(1)
        checkpoint = Path(tmp) / "cnn10.pt"
        torch.save(SmallCNN(in_channels=1, num_classes=10, image_size=8).state_dict(), checkpoint)
        for aggregation in ("plaintext", "ckks"):
            for trainable in ("all", "head", "lora"):
                row = one_round(Path(tmp) / f"{aggregation}_{trainable}", checkpoint, trainable, aggregation,
                                args.clients)  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    full = {r["aggregation"]: r["bytes_per_round"] for r in rows if r["trainable"] == "all"}
    for row in rows:
        row["bytes_per_round_full_model"] = full[row["aggregation"]]
        row["fraction_of_full_model"] = round(row["bytes_per_round"] / full[row["aggregation"]], 4)
    result = {
        "figure": "federated fine-tuning: bytes per round, only the trainable set travelling (issue 23 item 4)",
        "setup": f"digits, SmallCNN from a seeded 10-class checkpoint, {args.clients} clients, one round, DP-SGD "
        "epsilon 8 per client, LoRA r=2 (every Linear/Conv2d but the head), CKKS ring 4096 (2048 slots)",
        "method": "real ClientApp replies to the real strategy's messages, no engine; bytes = each reply's "
        "upload-bytes metric; 'all' is the whole model travelling",
        "caveat": "round_s measured on a shared, loaded 2-core machine: noisy; bytes are exact",
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

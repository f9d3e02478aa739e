"""The ClientApp: a thin adapter between Flower messages and :mod:`aisec_train.federated.task`.

Deployment: ``flower-supernode ... --node-config "partition-id=0 num-partitions=4 job='...' state-dir='...'
secret-context='...' secret-sha256='...'"`` (docs/federated.md). Simulation passes the same settings by closure.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aisec_train.crypto.ckks import decrypt_aggregate, encrypt_update, load_secret_context
from aisec_train.federated.settings import ClientSettings
from aisec_train.federated.strategy import ckks_payload, ckks_record
from aisec_train.federated.task import (
    REFUSAL_CODES,
    check_update,
    evaluate_local,
    flatten,
    initial_model,
    load_job,
    local_round,
    unflatten,
)


def _global_state(record: ArrayRecord, settings: ClientSettings, template: dict) -> tuple[dict, float]:
    """The global model: plaintext weights, or the encrypted aggregate decrypted with the clients' key."""
    payload = ckks_payload(record)
    if payload is None:
        return record.to_torch_state_dict(), 0.0
    started = time.perf_counter()
    ctx = load_secret_context(settings.secret_context, settings.secret_sha256 or None)
    mean = decrypt_aggregate(payload, ctx)
    return unflatten(mean, template), time.perf_counter() - started


def _drill(cfg, pid: int, server_round: int, delta: np.ndarray) -> np.ndarray:
    """Fault drills from federated.inject: crash, a NaN update, an over-norm update."""
    inject = cfg.federated.inject
    if inject.round not in (0, server_round):
        return delta
    if pid in inject.crash:
        raise RuntimeError(f"client {pid}: injected crash (federated.inject.crash) in round {server_round}")
    if pid in inject.nan:
        return np.where(np.arange(delta.size) == 0, np.nan, delta)
    if pid in inject.scale:
        return delta * 1e4
    return delta


def make_app(settings: ClientSettings | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # 1. Settings (closure in simulation, node config in deployment) and this node's partition.
        s = settings or ClientSettings.from_map(context.node_config)
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        cfg, job = load_job(s.job)
        template = initial_model(job, cfg.train.seed).state_dict()
        # 2. The global model (decrypting last round's aggregate on the CKKS path).
        global_state, _ = _global_state(msg.content["arrays"], s, template)
        # 3. Local DP-SGD with the spine's loop; the ledger persists in this client's state file.
        result = local_round(s.job, pid, global_state, rnd, s.state_path, threads=int(cfg.federated.client_cpus))
        delta = _drill(cfg, pid, rnd, result.delta)
        # 4. Refuse a bad update before it is encrypted (the server could not check it afterwards).
        skip = cfg.federated.inject.skip_client_check  # a drill: a malicious client that does not check itself
        reason = result.refused or (None if skip else check_update(delta, cfg.federated.max_update_norm))
        metrics = {"partition-id": pid, "num-examples": result.num_examples, **result.metrics,
                   "refused": REFUSAL_CODES[reason] if reason else 0, "encrypt-s": 0.0}
        weights = flatten(global_state) + delta
        # 5. Encrypt weight x update (CKKS) or send plaintext weights.
        if reason:
            arrays = ArrayRecord()  # nothing of this client's training leaves the node
        elif s.secret_context:
            started = time.perf_counter()
            ctx = load_secret_context(s.secret_context, s.secret_sha256 or None)
            arrays = ckks_record(encrypt_update(weights, result.num_examples, ctx))
            metrics["encrypt-s"] = time.perf_counter() - started
        else:
            arrays = ArrayRecord(unflatten(weights, template))
        metrics["upload-bytes"] = sum(len(a.data) for a in arrays.values())
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        # 1. Decrypt the aggregate (CKKS) and 2. measure it on this node's test shard.
        s = settings or ClientSettings.from_map(context.node_config)
        pid = int(context.node_config["partition-id"])
        cfg, job = load_job(s.job)
        global_state, decrypt_s = _global_state(msg.content["arrays"], s, initial_model(job, cfg.train.seed).state_dict())
        acc, n = evaluate_local(s.job, pid, global_state)
        metrics = MetricRecord({"accuracy": acc, "num-examples": n, "decrypt-s": decrypt_s, "partition-id": pid})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_app()

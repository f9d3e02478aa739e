"""The ClientApp: a thin adapter between Flower messages and :mod:`aisec_train.federated.task`.

Deployment: ``flower-supernode ... --node-config 'partition-id=0 job="..." state-dir="..." secret-context="..."
secret-sha256="..."'`` (docs/federated.md). Simulation passes the same settings by closure.
"""

from __future__ import annotations

import time
from functools import lru_cache

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aisec_train.crypto.ckks import decrypt_aggregate, encrypt_update, load_secret_context
from aisec_train.federated.settings import ClientSettings
from aisec_train.federated.strategy import ckks_payload, ckks_record
from aisec_train.federated.task import (
    REFUSAL_CODES,
    FederatedTask,
    apply_drill,
    check_update,
    evaluate_local,
    flatten,
    local_round,
    unflatten,
)


def _global_state(record: ArrayRecord, s: ClientSettings, template: dict) -> tuple[dict, float]:
    """The global model: plaintext weights, or the encrypted aggregate decrypted with the clients' key."""
    payload = ckks_payload(record)
    if payload is None:
        return record.to_torch_state_dict(), 0.0
    started = time.perf_counter()
    mean = decrypt_aggregate(payload, load_secret_context(s.secret_context, s.secret_sha256 or None))
    return unflatten(mean, template), time.perf_counter() - started


@lru_cache(maxsize=2)
def _task_from_job(job: str) -> FederatedTask:
    return FederatedTask.from_job(job)


def make_app(settings: ClientSettings | None = None, task: FederatedTask | None = None) -> ClientApp:
    """The ClientApp; ``settings`` and ``task`` replace the SuperNode's node config and job file (simulation)."""
    app = ClientApp()

    def _setup(msg: Message, context: Context):
        s = settings or ClientSettings.from_map(context.node_config)
        t = task or _task_from_job(s.job)
        template = t.initial_model().state_dict()
        return s, t, int(context.node_config["partition-id"]), *_global_state(msg.content["arrays"], s, template)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # 1. Settings, this node's partition and the global model (last round's aggregate, decrypted).
        s, t, pid, global_state, decrypt_s = _setup(msg, context)
        rnd, fed = int(msg.content["config"]["server-round"]), t.cfg.federated
        # 2. Local training with the spine's loop (DP-SGD, the run's objective); the ledger persists per client.
        result = local_round(t, pid, global_state, rnd, s.state_path, threads=int(fed.client_cpus))
        delta = apply_drill(fed.inject, pid, rnd, result.delta)
        # 3. Refuse a bad update before it is encrypted (the server could not check it afterwards).
        check = None if fed.inject.skip_client_check else check_update(delta, fed.max_update_norm)
        reason = result.refused or check
        metrics = {"partition-id": pid, "num-examples": result.num_examples, **result.metrics, "encrypt-s": 0.0,
                   "refused": REFUSAL_CODES[reason] if reason else 0, "decrypt-s": decrypt_s}  # fmt: skip
        # 4. Encrypt example count x weights (CKKS), or send plaintext weights; nothing when refused.
        weights, started = flatten(global_state) + delta, time.perf_counter()
        if reason:
            arrays = ArrayRecord()
        elif s.secret_context:
            ctx = load_secret_context(s.secret_context, s.secret_sha256 or None)
            arrays = ckks_record(encrypt_update(weights, result.num_examples, ctx))
            metrics["encrypt-s"] = time.perf_counter() - started
        else:
            arrays = ArrayRecord(unflatten(weights, global_state))
        metrics["upload-bytes"] = sum(len(a.data) for a in arrays.values())
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        # 1. Decrypt the aggregate (CKKS) and 2. measure it on this node's test shard.
        s, t, pid, global_state, decrypt_s = _setup(msg, context)
        acc, n = evaluate_local(t, pid, global_state)
        metrics = MetricRecord({"accuracy": acc, "num-examples": n, "decrypt-s": decrypt_s, "partition-id": pid})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_app()

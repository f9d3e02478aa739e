"""The ClientApp: a thin adapter between Flower messages and :mod:`aisec_train.federated.task`.

Deployment: ``flower-supernode ... --node-config 'partition-id=0 job="..." state-dir="..." secret-context="..."
secret-sha256="..."'`` (docs/federated.md). Simulation passes the same settings by closure.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aisec_train.backdoor.federated_poison import boost
from aisec_train.federated import client_level
from aisec_train.federated.client_dp import clip_update
from aisec_train.federated.client_keys import ClientKeys
from aisec_train.federated.client_level import EXTRA_KEYS
from aisec_train.federated.config import Aggregation, Defence, FederatedDP, dp_level
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
from aisec_train.train.config import PrivacyMode


def _global_state(record: ArrayRecord, keys: ClientKeys, template: dict) -> tuple[dict, np.ndarray, float]:
    """The global model (plaintext, or the aggregate decrypted) and the DP extras it carries (may be empty)."""
    payload = ckks_payload(record)
    if payload is None:
        state = record.to_torch_state_dict()
        extras = np.array([float(state.pop(k)) for k in EXTRA_KEYS if k in state])
        return state, extras, 0.0
    started = time.perf_counter()
    vector = keys.decrypt(payload)
    n = sum(v.numel() for v in template.values())
    return unflatten(vector[:n], template), vector[n:], time.perf_counter() - started


@lru_cache(maxsize=2)
def _task_from_job(job: str, job_sha256: str) -> FederatedTask:
    return FederatedTask.from_job(job, job_sha256)


def make_app(settings: ClientSettings | None = None, task: FederatedTask | None = None) -> ClientApp:
    """The ClientApp; ``settings`` and ``task`` replace the SuperNode's node config and job file (simulation)."""
    app = ClientApp()

    def _setup(msg: Message, context: Context):
        s = settings or ClientSettings.from_map(context.node_config)
        # job.json's pin: the node config's when its operator set one, else the run's (the server's messages)
        pin = s.job_sha256 or str(msg.content["config"].get("job-sha256", ""))
        t = task or _task_from_job(s.job, pin)
        keys = ClientKeys(s)
        template = t.global_state()  # only what travels (model.trainable may freeze the rest)
        pid = int(context.node_config["partition-id"])
        return s, t, keys, pid, *_global_state(msg.content["arrays"], keys, template)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # 1. Settings, this node's partition and the global model (last round's aggregate, decrypted).
        s, t, keys, pid, global_state, extras, decrypt_s = _setup(msg, context)
        config, fed = msg.content["config"], t.cfg.federated
        rnd, level = int(config["server-round"]), dp_level(fed, t.cfg.privacy.mode is PrivacyMode.dpsgd)
        # 2. Local training with the spine's loop (DP-SGD with dp=record, the run's objective); ledger per client.
        result = local_round(t, pid, global_state, rnd, s.state_path, threads=int(fed.client_cpus))
        delta = apply_drill(fed.inject, pid, rnd, result.delta)
        delta = boost(delta, pid, t.cfg)  # a malicious client's model-replacement boost (backdoor.boost)
        base = flatten(global_state)
        # 3. Refuse a bad update before it is encrypted (the server could not check it afterwards). Under
        #    dp=client the norm is clipped, not refused: a refusal bit would be a release no noise covers.
        check = None
        if not fed.inject.skip_client_check:
            check = check_update(delta, np.inf if level is FederatedDP.client else fed.max_update_norm)
        reason = result.refused or check
        metrics = {"partition-id": pid, "num-examples": result.num_examples, **result.metrics, "encrypt-s": 0.0,
                   "refused": REFUSAL_CODES[reason] if reason else 0, "decrypt-s": decrypt_s}  # fmt: skip
        weight = result.num_examples
        if level is FederatedDP.client:
            # 4a. DP-FedAvg: clip, add this client's noise share; the norm and the clip bit stay here, and so do
            #     the loss, the accuracy and the example count (data-dependent values no noise covers).
            plan = client_level.make_plan(fed)
            _, clip = client_level.decode(np.concatenate([base, extras]), base.size, plan)
            rng = _noise_rng(fed.client_dp.secure_noise, t.cfg.train.seed, pid, rnd)
            vector = None if reason else client_level.contribution(
                delta, base, plan, cohort=int(config["cohort"]), clip_norm=clip, rng=rng
            )[0]  # fmt: skip
            metrics.update({"num-examples": 1, "train-loss": float("nan"), "train-accuracy": float("nan")})
            weight = 1
        else:
            # 4b. Client-side norm bound under CKKS (the server cannot check it; a client may skip it).
            clip_here = fed.defence.name is Defence.norm_bound and fed.aggregation is Aggregation.ckks
            if clip_here and not reason and pid not in fed.inject.skip_clip:
                delta = clip_update(delta, fed.defence.norm_bound)[0]
            vector = base + delta
        # 5. Encrypt (CKKS, under this round's key) or send plaintext; nothing when refused.
        started = time.perf_counter()
        if reason:
            arrays = ArrayRecord()
        elif keys.encrypts:
            arrays = ckks_record(keys.encrypt(vector, weight, rnd, fed.ckks.rotate_every))
            metrics["encrypt-s"] = time.perf_counter() - started
        else:
            arrays = _plain_record(vector, global_state)
        metrics["upload-bytes"] = sum(len(a.data) for a in arrays.values())
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.query()
    def partition(msg: Message, context: Context) -> Message:
        # The server samples partitions, not Flower's random node ids, so a seeded run picks the same clients.
        metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        # 1. Decrypt the aggregate (CKKS) and 2. measure it on this node's test shard.
        s, t, _, pid, global_state, _, decrypt_s = _setup(msg, context)
        acc, n = evaluate_local(t, pid, global_state)
        metrics = MetricRecord({"accuracy": acc, "num-examples": n, "decrypt-s": decrypt_s, "partition-id": pid})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _plain_record(vector: np.ndarray, template: dict) -> ArrayRecord:
    """Plaintext weights; a DP contribution's two extra values travel as two one-value arrays."""
    n = sum(v.numel() for v in template.values())
    state = unflatten(vector[:n], template)
    for key, value in zip(EXTRA_KEYS, vector[n:], strict=False):
        state[key] = torch.tensor([value], dtype=torch.float64)
    return ArrayRecord(state)


def _noise_rng(secure: bool, seed: int, pid: int, rnd: int) -> np.random.Generator:
    """OS entropy (the default: nobody who knows the config can replay the noise), or a seeded draw for
    experiments that must compare two aggregations on the same noise (reported as not secure)."""
    return np.random.default_rng() if secure else np.random.default_rng([seed, pid, rnd, 0x44505])


app = make_app()

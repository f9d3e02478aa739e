"""The ClientApp: a thin adapter between Flower messages and :mod:`aisec_train.federated.task`.

Deployment: ``flower-supernode ... --node-config 'partition-id=0 job="..." state-dir="..." secret-context="..."
secret-sha256="..."'`` (docs/federated.md). Simulation passes the same settings by closure.
"""

from __future__ import annotations

import functools
import logging
import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from aisec_train.backdoor.federated_poison import boost
from aisec_train.crypto.ckks import InvalidCiphertextError
from aisec_train.errors import ConfigError, Refusal, one_line
from aisec_train.federated import client_checks, client_level
from aisec_train.federated.client_checks import UntrustedMessage
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

log = logging.getLogger("aisec_train.federated")


def _global_state(record: ArrayRecord, keys: ClientKeys, template: dict, extras: bool) -> tuple:
    """The global model (plaintext, or the aggregate decrypted) and the DP extras it carries (may be empty), once
    it is the model's keys, shapes and length and finite (client_checks; ``extras``: dp=client's two values)."""
    payload = ckks_payload(record)
    if payload is None:
        return *client_checks.plain_state(record, template, extras), 0.0
    if not keys.encrypts:
        raise UntrustedMessage("the server sent an encrypted aggregate to a client of a plaintext run; refusing it")
    started = time.perf_counter()
    try:
        vector = keys.decrypt(payload)
    except InvalidCiphertextError as err:  # malformed, foreign parameters, or a sum that wrapped
        raise UntrustedMessage(f"the server sent an aggregate that does not decrypt: {err}; refusing it") from err
    n = sum(v.numel() for v in template.values())
    vector = client_checks.decrypted(vector, n, extras)
    return unflatten(vector[:n], template), vector[n:], time.perf_counter() - started


def _refusing(handler):
    """A refusal (bad input: a server's value outside this client's job, an edited job file, a loss gone NaN) is the
    round's error reply, one line, instead of a traceback in the SuperNode's log; the server counts it dropped."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Refusal as err:
            reason = one_line(err)
            log.warning("client %s refused the %s message: %s", context.node_config.get("partition-id", "?"),
                        msg.metadata.message_type, reason)  # fmt: skip
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    return wrapped


@lru_cache(maxsize=2)
def _task_from_job(job: str, job_sha256: str) -> FederatedTask:
    return FederatedTask.from_job(job, job_sha256)


def make_app(settings: ClientSettings | None = None, task: FederatedTask | None = None) -> ClientApp:
    """The ClientApp; ``settings`` and ``task`` replace the SuperNode's node config and job file (simulation)."""
    app = ClientApp()

    def _setup(msg: Message, context: Context):
        client_checks.records(msg.content)
        s = settings or ClientSettings.from_map(context.node_config)
        # job.json's pin: the node config's when its operator set one, else the run's (the server's messages)
        pin = s.job_sha256 or str(msg.content["config"].get("job-sha256", ""))
        t = task or _task_from_job(s.job, pin)
        keys = ClientKeys(s)
        template = t.global_state()  # only what travels (model.trainable may freeze the rest)
        pid = int(context.node_config["partition-id"])
        level = dp_level(t.cfg.federated, t.cfg.privacy.mode is PrivacyMode.dpsgd)
        return s, t, keys, pid, *_global_state(msg.content["arrays"], keys, template, level is FederatedDP.client)

    @app.train()
    @_refusing
    def train(msg: Message, context: Context) -> Message:
        # 1. Settings, this node's partition and the global model (last round's aggregate, decrypted); the round
        #    (and under dp=client the cohort) within what this client's own job allows (client_checks).
        s, t, keys, pid, global_state, extras, decrypt_s = _setup(msg, context)
        config, fed = msg.content["config"], t.cfg.federated
        rnd = client_checks.server_round(config, fed.rounds)
        level = dp_level(fed, t.cfg.privacy.mode is PrivacyMode.dpsgd)
        # A CKKS run's client without a key would upload its update in plaintext: refused, never downgraded.
        if fed.aggregation is Aggregation.ckks and not keys.encrypts:
            raise ConfigError("federated.aggregation=ckks, but this client holds no secret context: no upload")
        base, plan, cohort, clip = flatten(global_state), None, 0, 0.0
        if level is FederatedDP.client:  # the cohort sizes the noise share; adaptive clipping reads C off the aggregate
            plan, cohort = client_level.make_plan(fed), client_checks.cohort(config, fed.clients)
            clip = client_checks.clip_norm(np.concatenate([base, extras]), base.size, plan)
        # 2. Local training with the spine's loop (DP-SGD with dp=record, the run's objective); ledger per client.
        result = local_round(t, pid, global_state, rnd, s.state_path, threads=int(fed.client_cpus))
        delta = apply_drill(fed.inject, pid, rnd, result.delta)
        delta = boost(delta, pid, t.cfg)  # a malicious client's model-replacement boost (backdoor.boost)
        # 3. Refuse a bad update before it is encrypted (the server could not check it afterwards). Under
        #    dp=client the norm is clipped, not refused: a refusal bit would be a release no noise covers.
        check = None
        if not fed.inject.skip_client_check:
            check = check_update(delta, np.inf if level is FederatedDP.client else fed.max_update_norm)
        reason = result.refused or check
        metrics = {"partition-id": pid, "num-examples": result.num_examples, **result.metrics, "encrypt-s": 0.0,
                   "refused": REFUSAL_CODES[reason] if reason else 0, "decrypt-s": decrypt_s}  # fmt: skip
        weight = result.num_examples
        if plan is not None:
            # 4a. DP-FedAvg: clip, add this client's noise share; the norm and the clip bit stay here, and so do
            #     the loss, the accuracy and the example count (data-dependent values no noise covers).
            rng = _noise_rng(fed.client_dp.secure_noise, t.cfg.train.seed, pid, rnd)
            vector = None if reason else client_level.contribution(
                delta, base, plan, cohort=cohort, clip_norm=clip, rng=rng
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
    @_refusing
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

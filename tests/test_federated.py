"""Federated building blocks without an engine: partitions, the strategy's FedAvg, refusals, quorum, config.

The strategy is fed real Flower ``Message`` objects (the ones a Grid returns) and real TenSEAL ciphertexts;
the whole apps run under the real engines in test_federated_sim.py and test_federated_deployment.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from aisec_train.config import to_config
from aisec_train.crypto import CkksParams, decrypt_aggregate, encrypt_update, generate_keys, load_secret_context
from aisec_train.errors import ConfigError
from aisec_train.federated.config import PartitionKind
from aisec_train.federated.partition import client_partition
from aisec_train.federated.strategy import SecureFedAvg, ckks_payload, ckks_record, load_state
from aisec_train.federated.task import check_update, flatten, unflatten
from tests.conftest import NodeGrid, run_cli
from tests.test_config import compose_config

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 balanced classes


# ---- partitions: the one client_partition both the trainer and the backdoor red team call -----------------
def _fed(**partition):
    from aisec_train.federated.config import FederatedConfig, FederatedMode, PartitionConfig

    return FederatedConfig(mode=FederatedMode.fedavg, clients=4, partition=PartitionConfig(**partition))


@pytest.mark.parametrize("kind", [PartitionKind.iid, PartitionKind.dirichlet, PartitionKind.shards])
def test_client_partition_follows_the_config_is_seeded_and_disjoint(kind):
    part = client_partition(LABELS, _fed(kind=kind, alpha=0.5, min_size=10), seed=3)
    joined = np.concatenate(part.indices)
    assert len(joined) == len(LABELS) and len(np.unique(joined)) == len(LABELS)
    assert part.kind == kind.value and part.num_clients == 4
    again = client_partition(LABELS, _fed(kind=kind, alpha=0.5, min_size=10), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(part.indices, again.indices, strict=True))
    if kind is PartitionKind.shards:
        assert max(part.to_report()["classes_per_client"]) <= 4  # 2 blocks of 75 over classes of 60: <= 2 each


def test_the_backdoor_red_team_poisons_the_partition_the_trainer_uses():
    """backdoor/federated_poison.py must hand the trainer the same shards (client i is client i)."""
    from aisec_train.backdoor import federated_poison

    cfg = to_config(compose_config("experiment=federated_he", "federated.partition.kind=dirichlet"))
    ours = client_partition(LABELS, cfg.federated, cfg.train.seed)
    theirs = federated_poison.client_partition(LABELS, cfg)
    theirs = theirs.indices if hasattr(theirs, "indices") else theirs
    assert all(np.array_equal(a, b) for a, b in zip(ours.indices, theirs, strict=True))


def test_check_update_refuses_nan_inf_and_norm():
    assert check_update(np.ones(4), 3.0) is None
    assert check_update(np.array([1.0, np.nan]), 3.0) == "nan"
    assert check_update(np.array([1.0, np.inf]), 3.0) == "nan"
    assert check_update(np.full(4, 2.0), 3.0) == "norm"  # L2 norm 4


# ---- the strategy on real Flower messages ---------------------------------------------------------------
TEMPLATE = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}


def _reply(msg: Message, pid: int, arrays: ArrayRecord, n: int, refused: int = 0) -> Message:
    metrics = MetricRecord({"partition-id": pid, "num-examples": n, "refused": refused, "upload-bytes": 1})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _start(strategy: SecureFedAvg, n_nodes: int, global_state: dict) -> list[Message]:
    return strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord({}), NodeGrid(n_nodes))


def test_plaintext_fedavg_is_the_weighted_mean_and_the_server_refuses_bad_updates(tmp_path, server_identity):
    strategy = SecureFedAvg(aggregation="plaintext", min_clients=2, max_update_norm=5.0, state_dir=tmp_path)
    msgs = _start(strategy, 4, TEMPLATE)
    rng = np.random.default_rng(0)
    good = [
        {k: v + torch.as_tensor(rng.normal(0, 0.1, v.shape), dtype=v.dtype) for k, v in TEMPLATE.items()}
        for _ in range(2)
    ]
    nan = {k: v.clone() for k, v in TEMPLATE.items()}
    nan["b"][0] = float("nan")
    big = {k: v + 100.0 for k, v in TEMPLATE.items()}  # clients 2 and 3 skipped their own check
    replies = [
        _reply(m, i, ArrayRecord(s), n)
        for i, (m, s, n) in enumerate(zip(msgs, [*good, nan, big], [30, 10, 5, 5], strict=True))
    ]
    arrays, summary = strategy.aggregate_train(1, replies)

    reference = (30 * flatten(good[0]) + 10 * flatten(good[1])) / 40
    np.testing.assert_allclose(flatten(arrays.to_torch_state_dict()), reference, atol=1e-6)
    row = strategy.history[-1]
    assert row["accepted"] == [0, 1] and row["failed"] is None and row["dropped"] == 0
    assert {(r["client"], r["reason"], r["by"]) for r in row["refused"]} == {
        (2, "nan", "server"),
        (3, "norm", "server"),
    }
    assert summary["refused"] == 2
    saved = load_state(tmp_path)
    assert saved["round"] == 1 and saved["model"]["kind"] == "plaintext"


def test_below_quorum_the_round_fails_and_the_global_model_is_kept(tmp_path, server_identity):
    strategy = SecureFedAvg(aggregation="plaintext", min_clients=3, max_update_norm=5.0, state_dir=tmp_path)
    msgs = _start(strategy, 4, TEMPLATE)
    moved = {k: v + 0.1 for k, v in TEMPLATE.items()}
    # Client 0 answers, client 1 crashed, client 2 refused itself, client 3 never answered (timeout).
    replies = [
        _reply(msgs[0], 0, ArrayRecord(moved), 10),
        Message(Error(code=0, reason="x\nclient 1: boom"), reply_to=msgs[1]),
        _reply(msgs[2], 2, ArrayRecord(), 10, refused=1),
    ]
    arrays, summary = strategy.aggregate_train(1, replies)
    assert arrays is None and summary["accepted"] == 1
    row = strategy.history[-1]
    assert row["dropped"] == 2 and row["errors"] == ["client 1: boom"]
    assert row["refused"] == [{"client": 2, "reason": "nan", "by": "client"}]
    assert "federated.min_clients=3" in row["failed"]
    kept = load_state(tmp_path)["model"]["tensors"]
    assert all(torch.equal(kept[k], TEMPLATE[k]) for k in TEMPLATE)


def test_ckks_strategy_adds_ciphertexts_equal_to_plaintext_fedavg(tmp_path, server_identity):
    keys = generate_keys(CkksParams(), tmp_path / "client_keys", tmp_path / "server")
    secret = load_secret_context(keys.secret_context)
    strategy = SecureFedAvg(
        aggregation="ckks",
        min_clients=2,
        max_update_norm=5.0,
        state_dir=tmp_path / "server",
        public_context=str(keys.public_context),
        public_sha256=keys.public_sha256,
    )
    assert not strategy.public_ctx.is_private()
    msgs = _start(strategy, 3, TEMPLATE)
    rng = np.random.default_rng(1)
    updates, weights = [rng.normal(0, 0.05, 16) for _ in range(3)], [120, 7, 33]
    replies = [
        _reply(m, i, ckks_record(encrypt_update(u, w, secret)), w)
        for i, (m, u, w) in enumerate(zip(msgs, updates, weights, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    mean = decrypt_aggregate(ckks_payload(arrays), secret)  # on a client, next round
    np.testing.assert_allclose(mean, np.average(updates, axis=0, weights=weights), atol=1e-6)
    assert unflatten(mean, TEMPLATE)["w"].shape == (3, 4)
    assert load_state(tmp_path / "server")["model"]["kind"] == "ckks"


# ---- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["federated.min_clients=9", "federated.clients=4"],
            "federated.min_clients=9 is not allowed: must be in [1, federated.clients=4]",
        ),
        (["federated.inject.crash=[5]"], "federated.inject=[5] is not allowed"),
        (
            [
                "federated.engine=deployment",
                "federated.deployment.superlink=10.1.2.3:9093",
                "federated.deployment.insecure=true",
            ],
            "federated.deployment.insecure=True is not allowed",
        ),
        (["federated.engine=deployment"], "federated.deployment.root_certificates=None is not allowed"),
        (["federated.ckks.coeff_mod_bit_sizes=[60,60]"], "totals 120 bits"),
        (["federated.ema_decay=1.5"], "federated.ema_decay=1.5 is not allowed"),
        (["federated.fraction_train=0"], "federated.fraction_train=0.0 is not allowed: must be in (0, 1]"),
        (
            ["federated.defence.name=median"],
            "federated.defence='median' is not allowed with federated.aggregation=ckks",
        ),
        (["federated.defence.name=krum"], "federated.defence='krum' is not allowed with federated.aggregation=ckks"),
        (
            ["federated.aggregation=plaintext", "federated.defence.name=krum", "federated.clients=4"],
            "federated.defence.num_malicious=1 is not allowed: Krum needs >= 2f+3 updates, got 4",
        ),
        (["federated.dp=client"], "federated.dp='client' is not allowed with privacy=dpsgd"),
        (["federated.dp=record", "privacy=none"], "federated.dp='record' is not allowed with privacy=none"),
        (
            ["federated.dp=client", "privacy=none", "federated.defence.name=norm_bound"],
            "federated.defence='norm_bound' is not allowed with federated.dp=client",
        ),
        (
            ["federated.aggregation=plaintext", "federated.ckks.rotate_every=2"],
            "federated.ckks.rotate_every=2 is not allowed: 0 unless federated.aggregation=ckks",
        ),
    ],
)
def test_bad_federated_values_name_the_key_the_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as info:
        to_config(compose_config("experiment=federated_he", *overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_refuses_a_quorum_above_the_clients_with_exit_2_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=federated_he", "federated.min_clients=9", "federated.clients=4", f"hydra.run.dir={run_dir}"
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "aisec-train: error: federated.min_clients=9 is not allowed: must be in [1, federated.clients=4]"
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not any((run_dir / p).exists() for p in ("report.json", "client_keys", "federated", "client_state"))


def test_client_gpu_share_follows_the_training_device():
    from aisec_train.federated.config import FederatedConfig, FederatedMode
    from aisec_train.federated.trainer import client_gpu_share

    fed = FederatedConfig(mode=FederatedMode.fedavg, clients=4)
    assert client_gpu_share(fed, torch.device("cpu")) == 0.0  # null on the CPU: no GPU asked of Ray
    assert client_gpu_share(fed, torch.device("cuda")) == min(1.0, torch.cuda.device_count() / 4)
    fed.client_gpus = 0.5
    assert client_gpu_share(fed, torch.device("cuda")) == 0.5
    fed.client_gpus = 0.0  # Ray would hide the GPU from clients told to train on it
    with pytest.raises(ConfigError, match="federated.client_gpus=0 is not allowed with train.device on CUDA"):
        client_gpu_share(fed, torch.device("cuda"))

"""The strategy at scale, on real Flower messages and real TenSEAL ciphertexts (no engine): client sampling,
the client-level ledger, DP-FedAvg's release through plaintext and CKKS aggregation, defences, key rotation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from aisec_train.config import to_config
from aisec_train.crypto import CkksParams, generate_keys
from aisec_train.crypto.rotation import epochs, rotate_keys
from aisec_train.federated import client_level
from aisec_train.federated.client_app import _plain_record
from aisec_train.federated.client_keys import ClientKeys
from aisec_train.federated.client_level import ClientLedger, contribution, decode, make_plan
from aisec_train.federated.settings import ClientSettings
from aisec_train.federated.strategy import SecureFedAvg, ckks_payload, ckks_record, load_state
from aisec_train.federated.task import flatten, unflatten
from tests.conftest import NodeGrid
from tests.test_config import compose_config

pytestmark = pytest.mark.usefixtures("server_identity")  # conftest.py
TEMPLATE = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
P = 16


def nodes(n: int) -> NodeGrid:
    """Node ids from 100 on: no node id equals a partition id, as with Flower's random ids."""
    return NodeGrid(n, first=100)


def _fed(*overrides: str):
    return to_config(
        compose_config("experiment=federated_scale", "privacy=none", "federated.dp=client", *overrides)
    ).federated


def _reply(msg: Message, pid: int, arrays: ArrayRecord, n: int = 1) -> Message:
    metrics = MetricRecord({"partition-id": pid, "num-examples": n, "refused": 0, "upload-bytes": 1})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


# ---- sampling and the client-level ledger --------------------------------------------------------------------
def test_poisson_sampling_charges_every_round_to_a_persisted_ledger_and_stops_at_the_budget(tmp_path):
    plan = make_plan(_fed("federated.rounds=3"))
    strategy = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path,
                            fraction_train=0.1, seed=4, dp=plan)  # fmt: skip
    sizes = []
    for rnd in (1, 2, 3):
        msgs = list(strategy.configure_train(rnd, ArrayRecord(TEMPLATE), ConfigRecord({}), nodes(100)))
        sizes.append(len(msgs))
        assert all(int(m.content["config"]["cohort"]) == len(msgs) for m in msgs)
    assert len(set(sizes)) > 1 and all(0 < s < 25 for s in sizes)  # Poisson: the cohort size varies around 10
    saved = client_level.read_ledger(tmp_path, plan.accountant, plan.delta)
    assert saved["steps"] == 3 and saved["rounds_charged"] == [1, 2, 3] and saved["sample_rate"] == 0.1
    # z was calibrated for 3 rounds: the budget is spent, and a fresh strategy on the same folder resumes it.
    assert saved["epsilon"] == pytest.approx(3.0, abs=0.05) and saved["epsilon"] <= 3.0
    again = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path,
                         fraction_train=0.1, seed=4, dp=plan)  # fmt: skip
    assert list(again.configure_train(4, ArrayRecord(TEMPLATE), ConfigRecord({}), nodes(100))) == []
    assert ClientLedger(tmp_path, plan).ledger.steps == 3  # nothing charged for a round that did not start


@pytest.mark.parametrize("dp", [False, True])
def test_a_seed_samples_the_same_partitions_whatever_ids_flower_gives_the_nodes(tmp_path, dp):
    """Flower draws random node ids in every run; the server samples over partition ids (learnt by
    ``partition_map``), so the same seed trains and evaluates the same clients."""
    plan = make_plan(_fed("federated.clients=20", "federated.fraction_train=0.25")) if dp else None
    picked = []
    for trial in range(2):
        grid = NodeGrid(20)
        grid.ids = [int(i) for i in np.random.default_rng(trial).choice(2**62, 20, replace=False)]
        s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path / str(trial),
                         fraction_train=0.25, fraction_evaluate=0.5, seed=3, dp=plan)  # fmt: skip
        s.partitions = {node: pid for pid, node in enumerate(grid.ids)}
        draws = []
        for rnd in (1, 2):
            train = s.configure_train(rnd, ArrayRecord(TEMPLATE), ConfigRecord({}), grid)
            evaluate = s.configure_evaluate(rnd, ArrayRecord(TEMPLATE), ConfigRecord({}), grid)
            draws.append([sorted(s.partitions[m.metadata.dst_node_id] for m in ms) for ms in (train, evaluate)])
        picked.append(draws)
    assert picked[0] == picked[1]
    assert picked[0][0] != picked[0][1]  # a new draw every round
    assert all(len(evaluated) == 10 for _, evaluated in picked[0])


def test_fixed_size_sampling_is_seeded_and_respects_the_quorum(tmp_path):
    def sample(seed: int, rnd: int, fraction: float, quorum: int) -> list[int]:
        s = SecureFedAvg(aggregation="plaintext", min_clients=quorum, max_update_norm=5.0, state_dir=tmp_path,
                         fraction_train=fraction, seed=seed)  # fmt: skip
        return [
            m.metadata.dst_node_id for m in s.configure_train(rnd, ArrayRecord(TEMPLATE), ConfigRecord({}), nodes(100))
        ]

    first = sample(0, 1, 0.1, 2)
    assert len(first) == 10 and first == sample(0, 1, 0.1, 2) and first != sample(0, 2, 0.1, 2)
    assert len(sample(0, 1, 0.01, 4)) == 4  # the quorum wins over a tiny fraction


# ---- DP-FedAvg through the two aggregations ----------------------------------------------------------------
def _dp_round(plan, cohort: int, rng) -> tuple[None, list[np.ndarray], None]:
    return None, [rng.normal(0, 1.0, P) for _ in range(cohort)], None


def _expected_step(plan, base, deltas, cohort):
    """DP-FedAvg by hand: clip each delta, add the same noise shares, sum, divide by q N."""
    k = cohort - client_level.tolerance(plan, cohort)
    shares = []
    for i, d in enumerate(deltas):
        rng = np.random.default_rng(i)
        clipped = d * min(1.0, plan.clip_norm / np.linalg.norm(d))
        shares.append(clipped + rng.normal(0, plan.update_noise * plan.clip_norm / np.sqrt(k), P))
    return base + plan.server_lr * np.sum(shares, axis=0) / plan.expected_cohort


def test_dp_contributions_release_dp_fedavg_in_plaintext_and_under_ckks(tmp_path):
    plan = make_plan(_fed("federated.clients=20", "federated.fraction_train=0.25"))  # q N = 5
    template = unflatten(np.random.default_rng(0).normal(0, 0.1, P), TEMPLATE)
    # Plaintext: the server averages every array (weights 1), extras included.
    plain = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path / "p",
                         fraction_train=0.25, dp=plan)  # fmt: skip
    msgs = list(plain.configure_train(1, ArrayRecord(template), ConfigRecord({}), nodes(20)))
    m = len(msgs)  # Poisson's draw, told to every sampled client
    base, deltas, vectors = _dp_round(plan, m, np.random.default_rng(1))
    base = flatten(template)
    vectors = [contribution(d, base, plan, cohort=m, clip_norm=plan.clip_norm, rng=np.random.default_rng(i))[0]
               for i, d in enumerate(deltas)]  # fmt: skip
    expected = _expected_step(plan, base, deltas, m)
    replies = [_reply(msg, i, _plain_record(v, template)) for i, (msg, v) in enumerate(zip(msgs, vectors, strict=True))]
    state = plain.aggregate_train(1, replies)[0].to_torch_state_dict()
    extras = np.array([float(state.pop(k)) for k in client_level.EXTRA_KEYS])
    np.testing.assert_allclose(flatten(state), expected, atol=1e-6)  # float32 weights
    assert extras[1] == pytest.approx(plan.clip_norm)
    # CKKS: the same vectors encrypted with weight 1; the server only adds; a client decrypts and decodes.
    keys = generate_keys(CkksParams(), tmp_path / "ck", tmp_path / "srv")
    client = ClientKeys(ClientSettings("job", "st", str(keys.secret_context), keys.secret_sha256))
    he = SecureFedAvg(aggregation="ckks", min_clients=1, max_update_norm=5.0, state_dir=tmp_path / "srv",
                      public_context=str(keys.public_context), fraction_train=0.25, dp=plan)  # fmt: skip
    msgs = list(he.configure_train(1, ArrayRecord(template), ConfigRecord({}), nodes(20)))
    assert len(msgs) == m  # the same seed and round draw the same cohort
    replies = [
        _reply(msg, i, ckks_record(client.encrypt(v, 1, 1, 0)))
        for i, (msg, v) in enumerate(zip(msgs, vectors, strict=True))
    ]
    weights, clip = decode(client.decrypt(ckks_payload(he.aggregate_train(1, replies)[0])), P, plan)
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    assert clip == pytest.approx(plan.clip_norm, abs=1e-5)


def test_shares_sum_to_the_accounted_noise_and_too_few_shares_are_not_released(tmp_path):
    plan = make_plan(
        _fed("federated.clients=40", "federated.fraction_train=0.25", "federated.client_dp.dropout_tolerance=2")
    )
    # Zero updates: the released step is pure noise of std server_lr z C sqrt(r / k) / (q N) per coordinate.
    zeros, m = np.zeros(20_000), 10
    vecs = [
        contribution(zeros, zeros, plan, cohort=m, clip_norm=1.0, rng=np.random.default_rng(i))[0] for i in range(m)
    ]
    total = np.sum([v[:-2] for v in vecs[: m - 2]], axis=0) * plan.expected_cohort / m  # 8 = k shares arrived
    assert np.std(total) == pytest.approx(plan.update_noise * 1.0, rel=0.03)
    strategy = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path,
                            fraction_train=0.25, dp=plan)  # fmt: skip
    assert strategy._release_refused(8, 10) is None
    assert "7 noise share(s) of 10 sampled, fewer than the 8 needed" in strategy._release_refused(7, 10)


def test_adaptive_clipping_moves_c_from_the_released_count():
    plan = make_plan(_fed("federated.clients=100", "federated.client_dp.adaptive=true", "federated.rounds=2",
                          "federated.client_dp.clip_norm=0.1"))  # fmt: skip
    assert plan.update_noise > plan.noise_multiplier and plan.count_stddev == pytest.approx(0.5)
    zeros, m = np.zeros(8), 10
    big = [contribution(np.full(8, 5.0), zeros, plan, cohort=m, clip_norm=0.1, rng=np.random.default_rng(i))[0]
           for i in range(m)]  # fmt: skip
    _, next_c = decode(np.mean(big, axis=0), 8, plan)
    assert next_c > 0.1  # every update was clipped: C grows
    with pytest.raises(Exception, match="count_stddev"):
        make_plan(_fed("federated.client_dp.adaptive=true", "federated.rounds=50"))  # z >= 2 sigma_b: refused


# ---- defences through the strategy ------------------------------------------------------------------------
@pytest.mark.parametrize("name, extra", [("krum", {}), ("median", {}), ("trimmed_mean", {"trim_fraction": 0.2}),
                                         ("norm_bound", {"norm_bound": 1.0})])  # fmt: skip
def test_plaintext_defences_resist_a_boosted_update_where_fedavg_does_not(tmp_path, name, extra):
    rng = np.random.default_rng(3)
    honest = [rng.normal(0.1, 0.05, P) for _ in range(9)]
    evil = np.full(P, -8.0)

    def step(defence: dict) -> np.ndarray:
        s = SecureFedAvg(aggregation="plaintext", min_clients=2, max_update_norm=100.0, state_dir=tmp_path / name,
                         defence=defence)  # fmt: skip
        msgs = list(s.configure_train(1, ArrayRecord(TEMPLATE), ConfigRecord({}), nodes(10)))
        updates = [*honest, evil]
        replies = [
            _reply(m, i, ArrayRecord(unflatten(u, TEMPLATE)), 10)
            for i, (m, u) in enumerate(zip(msgs, updates, strict=True))
        ]
        arrays, _ = s.aggregate_train(1, replies)
        return flatten(arrays.to_torch_state_dict())

    assert step({"name": "fedavg"}).mean() < -0.5
    robust = step({"name": name, "num_malicious": 1, **extra})
    assert robust.mean() > -0.2, robust
    assert load_state(tmp_path / name)["history"][-1]["update_norms"]["9"] == pytest.approx(32.0)


@pytest.mark.parametrize("defence", ["fedavg", "trimmed_mean"])
def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(tmp_path, defence):
    """Ray delivers replies in whatever order clients finish; float sums depend on their order, so the server
    aggregates in client order and a plaintext run is replayable from its seed."""
    rng = np.random.default_rng(5)
    updates = [rng.normal(0, 1, P).astype(np.float32) * 10.0 ** rng.integers(-3, 3) for _ in range(12)]

    def aggregate(order: list[int], name: str) -> np.ndarray:
        s = SecureFedAvg(aggregation="plaintext", min_clients=2, max_update_norm=1e6, state_dir=tmp_path / name,
                         defence={"name": defence, "num_malicious": 1, "trim_fraction": 0.1})  # fmt: skip
        msgs = list(s.configure_train(1, ArrayRecord(TEMPLATE), ConfigRecord({}), nodes(12)))
        replies = [_reply(msgs[i], i, ArrayRecord(unflatten(updates[i], TEMPLATE)), 3 + i) for i in order]
        return flatten(s.aggregate_train(1, replies)[0].to_torch_state_dict())

    forward = aggregate(list(range(12)), "a")
    for k, order in enumerate([list(range(11, -1, -1)), [int(i) for i in rng.permutation(12)]]):
        assert np.array_equal(aggregate(order, f"b{k}"), forward)


def test_a_defence_that_cannot_tolerate_its_attackers_fails_the_round_not_the_server(tmp_path):
    s = SecureFedAvg(aggregation="plaintext", min_clients=2, max_update_norm=100.0, state_dir=tmp_path,
                     defence={"name": "krum", "num_malicious": 1})  # fmt: skip
    msgs = list(s.configure_train(1, ArrayRecord(TEMPLATE), ConfigRecord({}), nodes(3)))
    arrays, _ = s.aggregate_train(1, [_reply(m, i, ArrayRecord(TEMPLATE), 5) for i, m in enumerate(msgs)])
    assert arrays is None and "Krum needs >= 2f+3 updates, got 3" in s.history[-1]["failed"]


# ---- key rotation through the strategy -----------------------------------------------------------------------
def test_rotation_binds_uploads_to_their_epoch_and_the_aggregate_names_its_key(tmp_path):
    client_root, server_root = tmp_path / "client_keys", tmp_path / "server" / "keys"
    for epoch in (0, 1):
        rotate_keys(CkksParams(), client_root, server_root, epoch)
    client = ClientKeys(ClientSettings("job", "st", secret_root=str(client_root)))
    s = SecureFedAvg(aggregation="ckks", min_clients=2, max_update_norm=5.0, state_dir=tmp_path / "server",
                     public_root=str(server_root), rotate_every=1)  # fmt: skip
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.05, P) for _ in range(3)]
    msgs = list(s.configure_train(2, ArrayRecord(TEMPLATE), ConfigRecord({}), nodes(3)))
    # Client 2 encrypts under round 1's key (stale): refused by the server, not summed into garbage.
    rounds = (2, 2, 1)
    replies = [_reply(m, i, ckks_record(client.encrypt(u, 10, r, 1)), 10)
               for i, (m, u, r) in enumerate(zip(msgs, updates, rounds, strict=True))]  # fmt: skip
    arrays, _ = s.aggregate_train(2, replies)
    row = s.history[-1]
    assert row["accepted"] == [0, 1] and row["refused"] == [{"client": 2, "reason": "key", "by": "server"}]
    payload = ckks_payload(arrays)
    assert epochs(client_root)[payload[4:20].hex()] == 1  # the aggregate names epoch 1's key
    np.testing.assert_allclose(client.decrypt(payload), np.mean(updates[:2], axis=0), atol=1e-6)

"""What the server accepts from a malicious client (red-team pass 2026-12-07, the server side): real Flower messages
and real TenSEAL ciphertexts through ``SecureFedAvg`` (no engine). Each reply below is one a client that knows the
code could send; the server refuses that reply with a reason, or fails the round, and never crashes the run,
weighs a count the client cannot hold, or releases a non-finite model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from aisec_train.config import to_config
from aisec_train.crypto import CkksParams, encrypt_update, generate_keys, load_secret_context
from aisec_train.crypto.ckks import EncryptedUpdate, InvalidCiphertextError, aggregate, decrypt_aggregate
from aisec_train.crypto.rotation import rotate_keys
from aisec_train.federated import server_app
from aisec_train.federated.client_app import _plain_record
from aisec_train.federated.client_keys import ClientKeys
from aisec_train.federated.client_level import contribution, make_plan
from aisec_train.federated.settings import ClientSettings, ServerSettings
from aisec_train.federated.strategy import SecureFedAvg, ckks_payload, ckks_record, load_state
from aisec_train.federated.task import flatten, unflatten, write_job
from tests.conftest import NodeGrid
from tests.test_config import compose_config

pytestmark = pytest.mark.usefixtures("server_identity")  # conftest.py
TEMPLATE = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
P = 16


def _reply(msg: Message, pid: int, arrays, n: int = 10, **metrics) -> Message:
    content = {"metrics": MetricRecord({"partition-id": pid, "num-examples": n, "refused": 0, **metrics})}
    if arrays is not None:
        content["arrays"] = arrays
    return Message(RecordDict(content), reply_to=msg)


def _ask(strategy: SecureFedAvg, clients: int, rnd: int = 1) -> list[Message]:
    return list(strategy.configure_train(rnd, ArrayRecord(TEMPLATE), ConfigRecord({}), NodeGrid(clients, first=100)))


def _outcome(strategy: SecureFedAvg) -> tuple[list[int], set[tuple[int, str]], str | None]:
    row = strategy.history[-1]
    return row["accepted"], {(r["client"], r["reason"]) for r in row["refused"]}, row["failed"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """One key pair and two rotation epochs (real TenSEAL keys; generated once for the module)."""
    root = tmp_path_factory.mktemp("keys")
    pair = generate_keys(CkksParams(), root / "client", root / "server")
    for epoch in (0, 1):
        rotate_keys(CkksParams(), root / "rot_client", root / "rot_server", epoch)
    return pair, load_secret_context(pair.secret_context), root


def _ckks(tmp_path, keys, rotate: bool, **kwargs) -> SecureFedAvg:
    pair, _, root = keys
    where = {"public_root": str(root / "rot_server"), "rotate_every": 1} if rotate else {}
    return SecureFedAvg(aggregation="ckks", min_clients=1, max_update_norm=5.0, state_dir=tmp_path,
                        public_context="" if rotate else str(pair.public_context), **where, **kwargs)  # fmt: skip


def _upload(keys, rotate: bool, vector: np.ndarray, weight: int = 10):
    pair, secret, root = keys
    if rotate:
        return ClientKeys(ClientSettings("job", "st", secret_root=str(root / "rot_client"))).encrypt(
            vector, weight, 1, 1
        )
    return encrypt_update(vector, weight, secret)


# ---- a CKKS reply that holds no ciphertext ---------------------------------------------------------------------
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize(
    "arrays",
    [None, ArrayRecord(TEMPLATE), MetricRecord({"ckks": 1})],
    ids=["no arrays", "plaintext weights", "a metric record as arrays"],
)
def test_a_ckks_reply_without_a_ciphertext_is_refused_not_a_crash(tmp_path, keys, rotate, arrays):
    """Before: KeyError 'arrays' (no arrays), TypeError from untag(None) (plaintext under rotation), AttributeError
    (a record of another type) out of aggregate_train, which Flower's Strategy.start does not catch: one client's
    reply ended the whole run."""
    s = _ckks(tmp_path, keys, rotate)
    msgs = _ask(s, 3)
    rng = np.random.default_rng(0)
    replies = [_reply(msgs[i], i, ckks_record(_upload(keys, rotate, rng.normal(0, 0.05, P)))) for i in range(2)]
    arrays_out, _ = s.aggregate_train(1, [*replies, _reply(msgs[2], 2, arrays)])
    assert _outcome(s) == ([0, 1], {(2, "malformed")}, None) and arrays_out is not None


# ---- the weight a ciphertext's header declares ---------------------------------------------------------------
def test_a_ckks_header_weight_must_be_the_count_the_client_claims(tmp_path, keys):
    """The sum is divided by the headers' weights, which the server adds in plaintext: before, one client whose
    header said 10^15 (its metrics 10) shrank every client's decrypted model to ~1e-16, a global model wiped out."""
    _, secret, _ = keys
    s = _ckks(tmp_path, keys, rotate=False)
    msgs = _ask(s, 3)
    rng = np.random.default_rng(1)
    ups = [rng.normal(0, 0.05, P) for _ in range(3)]
    wire = [encrypt_update(u, 10, secret) for u in ups]
    liar = EncryptedUpdate(wire[2].chunks, wire[2].length, 10**15)
    replies = [_reply(msgs[i], i, ckks_record(w)) for i, w in enumerate([*wire[:2], liar])]
    arrays, _ = s.aggregate_train(1, replies)
    assert _outcome(s) == ([0, 1], {(2, "count")}, None)
    np.testing.assert_allclose(decrypt_aggregate(ckks_payload(arrays), secret), np.mean(ups[:2], axis=0), atol=1e-6)


def test_weights_past_the_64_bit_header_fail_the_round_not_the_server(tmp_path, keys):
    """Before: the summed weight overflowed struct's 'Q' when the aggregate was serialized (struct.error, uncaught)."""
    _, secret, _ = keys
    big = 2**63 - 1  # the largest count a MetricRecord carries; three of them pass 2^64
    wire = [EncryptedUpdate(encrypt_update(np.full(P, 0.01), 1, secret).chunks, P, big) for _ in range(3)]
    with pytest.raises(InvalidCiphertextError, match="beyond the 64-bit weight field"):
        aggregate(wire, keys[0].public_context)
    s = _ckks(tmp_path, keys, rotate=False)  # no partition caps: the header check alone lets these through
    msgs = _ask(s, 3)
    arrays, _ = s.aggregate_train(
        1, [_reply(m, i, ckks_record(w), big) for i, (m, w) in enumerate(zip(msgs, wire, strict=True))]
    )
    accepted, _, failed = _outcome(s)
    assert arrays is None and accepted == [0, 1, 2] and "beyond the 64-bit weight field" in failed


# ---- claimed example counts against the partition ------------------------------------------------------------
CAPS = {0: (50, 20), 1: (50, 20), 2: (50, 20)}


@pytest.mark.parametrize("defence", [{"name": "fedavg"}, {"name": "norm_bound", "norm_bound": 1.0}])
def test_a_count_beyond_the_clients_partition_is_refused(tmp_path, defence):
    """Before: a client claiming 10^12 examples took the whole weighted step (FedAvg, and the direction of
    norm_bound's clipped mean) with an update the norm check passed."""
    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=100.0, state_dir=tmp_path,
                     defence=defence, example_caps=CAPS)  # fmt: skip
    msgs = _ask(s, 3)
    honest = np.full(P, 0.1)
    replies = [_reply(msgs[i], i, ArrayRecord(unflatten(honest, TEMPLATE)), 50) for i in range(2)]
    evil = _reply(msgs[2], 2, ArrayRecord(unflatten(np.full(P, -0.2), TEMPLATE)), 10**12)
    arrays, _ = s.aggregate_train(1, [*replies, evil])
    assert _outcome(s) == ([0, 1], {(2, "count")}, None)
    assert flatten(arrays.to_torch_state_dict()).min() > 0  # the honest direction, not the attacker's
    # the same client with a count its partition can hold is aggregated (the cap refuses only the impossible)
    s2 = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=100.0, state_dir=tmp_path / "ok",
                      defence=defence, example_caps=CAPS)  # fmt: skip
    arrays = [r.content["arrays"] for r in (*replies, evil)]
    s2.aggregate_train(1, [_reply(m, i, a, 50) for i, (m, a) in enumerate(zip(_ask(s2, 3), arrays, strict=True))])
    assert _outcome(s2)[:2] == ([0, 1, 2], set())


def test_a_ckks_count_beyond_the_partition_is_refused(tmp_path, keys):
    _, secret, _ = keys
    s = _ckks(tmp_path, keys, rotate=False, example_caps=CAPS)
    msgs = _ask(s, 3)
    wire = [encrypt_update(np.full(P, 0.01), n, secret) for n in (50, 50, 51)]
    s.aggregate_train(
        1, [_reply(m, i, ckks_record(w), w.weight) for i, (m, w) in enumerate(zip(msgs, wire, strict=True))]
    )
    assert _outcome(s) == ([0, 1], {(2, "count")}, None)


def test_an_evaluation_count_beyond_the_test_shard_is_left_out_of_the_reported_accuracy(tmp_path):
    """Before: one evaluator reporting accuracy 1.0 over 10^9 examples made the report's test accuracy ~1.0."""
    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=100.0, state_dir=tmp_path,
                     example_caps=CAPS)  # fmt: skip
    msgs = _ask(s, 3)
    s.aggregate_train(1, [_reply(m, i, ArrayRecord(TEMPLATE), 50) for i, m in enumerate(msgs)])
    evals = [
        Message(RecordDict({"metrics": MetricRecord({"partition-id": i, "num-examples": n, "accuracy": acc})}),
                reply_to=m)
        for i, (m, n, acc) in enumerate(zip(msgs, (20, 20, 10**9), (0.5, 0.7, 1.0), strict=True))
    ]  # fmt: skip
    s.aggregate_evaluate(1, evals)
    row = load_state(tmp_path)["history"][-1]
    assert row["test_accuracy"] == pytest.approx(0.6) and row["evaluated_clients"] == 2


# ---- non-finite values the server used to release ------------------------------------------------------------
def test_non_finite_dp_extras_are_refused_and_a_non_finite_aggregate_is_never_released(tmp_path):
    """Under dp=client the server checked the weights only: a reply with inf in ``dp.count`` (or NaN in
    ``dp.clip``) was averaged into the released model; and finite values can still sum past float64's range
    (two counts of 1e308), which the aggregate's own check keeps from release."""
    fed = to_config(compose_config("experiment=federated_scale", "privacy=none", "federated.dp=client",
                                   "federated.clients=3", "federated.fraction_train=1.0",
                                   "federated.client_dp.dropout_tolerance=1")).federated  # fmt: skip
    plan = make_plan(fed)
    base = flatten(TEMPLATE)

    def shares(s: SecureFedAvg, poison, evil=(2,)) -> list[Message]:
        msgs = _ask(s, 3)
        out = []
        for i, m in enumerate(msgs):
            rng = np.random.default_rng(i)
            v = contribution(np.full(P, 0.01), base, plan, cohort=len(msgs), clip_norm=plan.clip_norm, rng=rng)[0]
            record = _plain_record(v, TEMPLATE)
            out.append(_reply(m, i, poison(record) if i in evil else record, 1))
        return out

    def inf_count(record: ArrayRecord) -> ArrayRecord:
        state = record.to_torch_state_dict()
        return ArrayRecord({**state, "dp.count": torch.tensor([np.inf], dtype=torch.float64)})

    def huge_count(record: ArrayRecord) -> ArrayRecord:  # finite, but two of them sum to inf
        state = record.to_torch_state_dict()
        return ArrayRecord({**state, "dp.count": torch.tensor([1e308], dtype=torch.float64)})

    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path / "a",
                     fraction_train=1.0, dp=plan)  # fmt: skip
    arrays, _ = s.aggregate_train(1, shares(s, inf_count))
    assert _outcome(s)[:2] == ([0, 1], {(2, "nan")})
    assert all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values())
    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path / "b",
                     fraction_train=1.0, dp=plan)  # fmt: skip
    arrays, _ = s.aggregate_train(1, shares(s, huge_count, evil=(1, 2)))
    assert arrays is None and "NaN or inf" in _outcome(s)[2]
    saved = load_state(tmp_path / "b")["model"]["tensors"]  # the kept (initial) model, not the inf one
    assert all(torch.isfinite(v).all() for v in saved.values())


# ---- the ServerApp gives the strategy the caps -------------------------------------------------------------
class _Stop(Exception):
    pass


def test_the_server_app_caps_each_clients_count_by_its_partition(tmp_path, monkeypatch):
    """The caps come from the task's partition (index arrays), so a deployment's server has them too."""
    cfg = to_config(compose_config("experiment=federated_he", "federated.aggregation=plaintext", "privacy=none"))
    job, sha = write_job(cfg, tmp_path / "job.json", manifest_sha256="0" * 64)
    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise _Stop

    class Task:  # the parts of FederatedTask the server reads
        train_parts = (np.arange(7), np.arange(9))
        test_parts = (np.arange(3), np.arange(4))

        def global_state(self):
            return TEMPLATE

    monkeypatch.setattr(server_app, "SecureFedAvg", Recorder)
    app = server_app.make_app(ServerSettings(str(job), str(tmp_path / "state"), job_sha256=sha), Task())
    with pytest.raises(_Stop):
        app._main(NodeGrid(2), None)
    assert seen["example_caps"] == {0: (7, 3), 1: (9, 4)}


# ---- the report's training curve ----------------------------------------------------------------------------
def test_the_training_curve_holds_the_aggregated_clients_figures_only(tmp_path):
    """Before: the curve averaged every reply's own loss and accuracy, the server-refused ones included and an
    accuracy of 55 as given: one malicious client made the round's loss 3e8 and its train accuracy 18.9."""
    from aisec_train.federated.report import history_rows

    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=1.0, state_dir=tmp_path)
    msgs = _ask(s, 3)
    figures = [(0.01, 0.5, 0.8), (0.01, 0.7, 55.0), (50.0, 1e9, 0.9)]  # (update value, loss, accuracy)
    replies = [
        _reply(m, i, ArrayRecord(unflatten(np.full(P, v), TEMPLATE)), 5, **{"train-loss": loss, "train-accuracy": acc})
        for i, (m, (v, loss, acc)) in enumerate(zip(msgs, figures, strict=True))
    ]
    s.aggregate_train(1, replies)
    assert _outcome(s) == ([0, 1], {(2, "norm")}, None)
    row = history_rows(s.history)[0]
    assert row["loss"] == pytest.approx(0.6) and row["train_accuracy"] == pytest.approx(0.8)


def test_metrics_of_another_record_type_do_not_reach_the_report(tmp_path):
    """A ConfigRecord under ``metrics`` passes the integer checks but may carry bytes and strings: before, they went
    into the saved history and the report crashed at the end of the run (TypeError in the loss mean)."""
    from aisec_train.federated.report import history_rows, per_round

    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=1.0, state_dir=tmp_path)
    msgs = _ask(s, 2)
    forged = ConfigRecord(
        {"partition-id": 1, "num-examples": 5, "refused": 0, "train-loss": b"x" * 10, "upload-bytes": "lots"}
    )
    replies = [_reply(msgs[0], 0, ArrayRecord(TEMPLATE), 5, **{"train-loss": 0.5, "upload-bytes": 7})]
    replies.append(Message(RecordDict({"arrays": ArrayRecord(TEMPLATE), "metrics": forged}), reply_to=msgs[1]))
    s.aggregate_train(1, replies)
    history = load_state(tmp_path)["history"]
    assert history_rows(history)[0]["loss"] == 0.5
    size = sum(len(a.data) for a in ArrayRecord(TEMPLATE).values())
    assert per_round(history)[0]["upload_bytes_per_client"] == {"0": size, "1": size}  # as received, not claimed


def test_two_replies_naming_one_partition_are_both_refused(tmp_path):
    """A node that did not answer ``partition_map`` (or answered another's id) could name an honest client's
    partition: before, both were aggregated, the attacker weighed and capped as that client, and the report's
    per-client figures listed one partition twice ([0, 0, 1])."""
    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=10.0, state_dir=tmp_path,
                     example_caps=CAPS)  # fmt: skip
    msgs = _ask(s, 3)
    s.partitions = {100: 0, 101: 1}  # node 102 never said which partition it serves
    replies = [_reply(m, pid, ArrayRecord(TEMPLATE), 5) for m, pid in zip(msgs, (0, 1, 0), strict=True)]
    s.aggregate_train(1, replies)
    row = s.history[-1]
    assert row["accepted"] == [1] and [r["client"] for r in row["refused"]] == [0, 0]


def test_the_silo_item_says_which_clients_and_rounds_contributed():
    """Before: "4 Flower clients trained ... for 2 round(s)" whatever happened; a client refused or dropped in every
    round, and a failed round, were reported as training."""
    from types import SimpleNamespace

    from aisec_train.federated.report import _checklist
    from aisec_train.report.report import Report

    cfg = to_config(compose_config("experiment=federated_he", "federated.aggregation=plaintext", "privacy=none"))
    run = SimpleNamespace(report=Report(), cfg=cfg)
    rows = [
        {"round": 1, "accepted": [0, 2], "refused": [{"client": 1, "reason": "count", "by": "server"}], "dropped": 1,
         "failed": None},
        {"round": 2, "accepted": [0], "refused": [], "dropped": 3, "failed": "1 usable update(s) < 2"},
    ]  # fmt: skip
    _checklist(run, rows, None, None, None, "in-process")
    silo = next(c for c in run.report.checklist if c["item"].startswith("training data stays in its silo"))
    assert "1 of 2 round(s) aggregated, with updates from 2 client(s) [0, 2]" in silo["evidence"]


def test_the_reported_upload_size_is_what_the_server_received(tmp_path):
    """Before: ``upload_bytes`` (and the report's bytes per parameter, a criterion <= 40) was each client's claim."""
    from aisec_train.federated.report import per_round

    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=1.0, state_dir=tmp_path)
    msgs = _ask(s, 2)
    s.aggregate_train(1, [_reply(m, i, ArrayRecord(TEMPLATE), 5, **{"upload-bytes": 1}) for i, m in enumerate(msgs)])
    size = sum(len(a.data) for a in ArrayRecord(TEMPLATE).values())
    assert size > 1 and per_round(load_state(tmp_path)["history"])[0]["upload_bytes_per_client"] == {
        "0": size,
        "1": size,
    }


def test_under_client_level_dp_every_ckks_share_must_weigh_one(tmp_path, keys):
    """DP-FedAvg's clients all send weight 1 (each share counts once); before, one share whose header and count
    said 300 (within its partition's cap) divided the released sum by 303 instead of 4: the model was wiped."""
    _, secret, _ = keys
    fed = to_config(compose_config("experiment=federated_scale", "privacy=none", "federated.dp=client",
                                   "federated.clients=4", "federated.fraction_train=1.0",
                                   "federated.client_dp.dropout_tolerance=1")).federated  # fmt: skip
    plan = make_plan(fed)
    s = _ckks(tmp_path, keys, rotate=False, fraction_train=1.0, dp=plan, example_caps={i: (360, 90) for i in range(4)})
    msgs = _ask(s, 4)
    base = flatten(TEMPLATE)
    replies = []
    for i, m in enumerate(msgs):
        rng = np.random.default_rng(i)
        v = contribution(np.full(P, 0.01), base, plan, cohort=len(msgs), clip_norm=plan.clip_norm, rng=rng)[0]
        up = encrypt_update(v, 1, secret)
        weight = 300 if i == 3 else 1
        replies.append(_reply(m, i, ckks_record(EncryptedUpdate(up.chunks, up.length, weight)), weight))
    arrays, _ = s.aggregate_train(1, replies)
    assert _outcome(s) == ([0, 1, 2], {(3, "count")}, None) and arrays is not None


def test_a_plaintext_array_is_checked_as_declared_before_its_bytes_are_loaded(tmp_path):
    """Before: an array declared (3, 4) float32 whose .npy header claimed 10^11 float64 made numpy allocate 745 GiB:
    MemoryError out of aggregate_train, the run over. Another dtype than the model's is refused as well (the
    DP mean used to take the first reply's dtype for the released model)."""
    import io

    from flwr.app import Array

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**11,)})
    bomb = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=buf.getvalue() + bytes(64))
    wider = {k: v.double() for k, v in TEMPLATE.items()}
    s = SecureFedAvg(aggregation="plaintext", min_clients=1, max_update_norm=5.0, state_dir=tmp_path)
    msgs = _ask(s, 3)
    arrays = [ArrayRecord(TEMPLATE), ArrayRecord({"w": bomb, "b": ArrayRecord(TEMPLATE)["b"]}), ArrayRecord(wider)]
    s.aggregate_train(1, [_reply(m, i, a, 5) for i, (m, a) in enumerate(zip(msgs, arrays, strict=True))])
    assert _outcome(s) == ([0], {(1, "malformed"), (2, "malformed")}, None)

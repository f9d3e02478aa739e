"""The client side against a malicious or broken server (red-team pass 2026-12-07, docs/federated.md "What a client
trusts the server with").

A client acts on nothing the server sends until it fits the client's own pinned job: the global model (keys,
shapes, dtypes, finite; under CKKS an aggregate that decrypts to the model's length), the round number, the DP-FedAvg
cohort and the clip norm an aggregate carries. A refusal is the round's error reply (one line), with nothing trained
and no budget spent; the ClientApp does not raise. The fast tests run the real ClientApp (Opacus, TenSEAL) on
crafted Flower messages; the slow one runs a malicious ServerApp against it on Flower's simulation engine.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import aisec_train
from aisec_train.crypto import CkksParams, generate_keys
from aisec_train.crypto.ckks import aggregate, encrypt_update, load_public_context, load_secret_context
from aisec_train.crypto.rotation import rotate_keys, tag
from aisec_train.federated import client_app, client_checks, client_level
from aisec_train.federated.settings import ClientSettings
from aisec_train.federated.strategy import ckks_payload, ckks_record
from aisec_train.federated.task import FederatedTask, flatten, load_client_state, write_job

pytestmark = pytest.mark.usefixtures("server_identity")  # conftest.py: Flower's task identity for new messages
ROUNDS = 2


def _task(tmp_path, *overrides: str) -> FederatedTask:
    cfg = aisec_train.compose(["federated=fedavg", "federated.clients=2", "federated.local_epochs=1",
                               f"federated.rounds={ROUNDS}", "privacy.target_epsilon=8", *overrides])  # fmt: skip
    path, digest = write_job(cfg, tmp_path / "job.json", manifest_sha256="test")
    return FederatedTask.from_job(str(path), digest)


def _client(tmp_path, task: FederatedTask, **secret: str):
    settings = ClientSettings(job=str(tmp_path / "job.json"), state_dir=str(tmp_path / "clients"), **secret)
    return client_app.make_app(settings, task)


def _send(app, arrays: ArrayRecord, config: dict, kind: str = MessageType.TRAIN) -> Message:
    """One message from the 'server' to partition 0, answered by the real ClientApp (which must not raise)."""
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=1, message_type=kind)
    ctx = Context(run_id=7, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return app(msg, ctx)


def _refused(reply: Message, *words: str) -> str:
    assert reply.has_error(), f"the client answered {reply.content['metrics'] if reply.has_content() else reply}"
    reason = reply.error.reason
    assert "\n" not in reason and "Traceback" not in reason, reason
    assert all(w in reason for w in words), reason
    return reason


def _nothing_trained(tmp_path) -> bool:
    return load_client_state(tmp_path / "clients", 0) == {"ledger": None, "rounds": []}


def _forged_header(shape: tuple[int, ...]) -> Array:
    """An array declared as conv1's (32, 1, 3, 3) float32 whose .npy bytes claim ``shape`` (numpy allocates that)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return Array(dtype="float32", shape=(32, 1, 3, 3), stype="numpy.ndarray", data=header.getvalue())


def _with(state: dict, key: str, value) -> ArrayRecord:
    out = {k: v.clone() for k, v in state.items()}
    if value is None:
        out.pop(key)
    else:
        out[key] = value
    return ArrayRecord(out)


def test_a_non_finite_or_misshapen_global_model_is_refused_before_any_training(tmp_path):
    # Before: NaN/inf/1e300-as-float64 trained a DP round until the loss went NaN (NonFiniteError traceback),
    # float16/int64 were silently cast and trained on, and a missing, unknown or reshaped array raised
    # load_state_dict's RuntimeError out of the ClientApp.
    task = _task(tmp_path)
    app, g = _client(tmp_path, task), task.global_state()
    w = g["conv1.weight"]
    ok = {"server-round": 1}
    cases = {
        "NaN": _with(g, "conv1.weight", w.clone().fill_(math.nan)),
        "inf": _with(g, "fc2.bias", g["fc2.bias"].clone().fill_(math.inf)),
        "float64": _with(g, "conv1.weight", w.double() * 0 + 1e300),  # finite, inf once cast to float32
        "float16": _with(g, "conv1.weight", w.half()),
        "(288,)": _with(g, "conv1.weight", w.reshape(-1)),
        "missing": _with(g, "fc2.bias", None),
        "unknown": _with(g, "evil", torch.zeros(3)),
    }
    for word, arrays in cases.items():
        _refused(_send(app, arrays, ok), word)
    forged = ArrayRecord({**{k: Array(v.numpy()) for k, v in g.items()}, "conv1.weight": _forged_header((2**40,))})
    _refused(_send(app, forged, ok), "conv1.weight", "do not load")
    _refused(_send(app, cases["NaN"], ok, MessageType.EVALUATE), "NaN")  # evaluation reads the same model
    assert _nothing_trained(tmp_path)


def test_a_message_without_the_model_or_the_config_record_is_refused(tmp_path):
    # Before: msg.content["config"] raised a KeyError out of the ClientApp; a ConfigRecord where the arrays belong an
    # AttributeError.
    task = _task(tmp_path)
    app = _client(tmp_path, task)
    g, config = ArrayRecord(task.global_state()), ConfigRecord({"server-round": 1})
    for content in ({"arrays": g}, {"config": config}, {"arrays": config, "config": config}):
        msg = Message(RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)
        ctx = Context(run_id=7, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        _refused(app(msg, ctx), "records", "ArrayRecord")
    assert _nothing_trained(tmp_path)


@pytest.mark.parametrize("rnd", [0, ROUNDS + 1, 10**9, -1, "1", 1.0, True, None])
def test_a_round_number_outside_the_run_is_refused(tmp_path, rnd):
    # Before: any int trained (and was recorded) as that round; a string or a missing key raised out of int().
    task = _task(tmp_path)
    config = {"cohort": 2} if rnd is None else {"server-round": rnd, "cohort": 2}
    _refused(_send(_client(tmp_path, task), ArrayRecord(task.global_state()), config), "server-round", f"[1, {ROUNDS}]")
    assert _nothing_trained(tmp_path)


@pytest.mark.parametrize("cohort", [10**9, 3, 0, -3])
def test_a_dp_fedavg_cohort_larger_than_the_federation_is_refused(tmp_path, cohort):
    # Before: cohort=10**9 shrank the noise share to z C / sqrt(10**9): the plaintext reply was the clipped update
    # with noise of norm ~0.01 instead of ~283, and under CKKS the released sum carried almost none of the accounted
    # noise. 0 and -3 raised a ConfigError traceback naming federated.dp.dropout_tolerance.
    task = _task(tmp_path, "privacy=none", "federated.dp=client")
    reply = _send(_client(tmp_path, task), ArrayRecord(task.global_state()), {"server-round": 1, "cohort": cohort})
    _refused(reply, "cohort", "federated.clients=2")
    assert _nothing_trained(tmp_path)


def test_a_fixed_clip_norm_is_the_jobs_whatever_the_aggregate_carries(tmp_path):
    # Before: without adaptive clipping the client still clipped (and sized its noise) at the C the aggregate
    # carried: a server could hand one client C=1e6 and the others C=1e-9, so the released sum's noise covered the
    # others' clip, not that client's update.
    task = _task(tmp_path, "privacy=none", "federated.dp=client")
    plan = client_level.make_plan(task.cfg.federated)
    g = task.global_state()
    base = flatten(g)
    for carried in (1e6, 1e-9):
        assert client_level.decode(np.concatenate([base, [0.0, carried]]), base.size, plan)[1] == plan.clip_norm
    extras = {"dp.count": torch.tensor([0.0], dtype=torch.float64), "dp.clip": torch.tensor([1e6], dtype=torch.float64)}
    reply = _send(_client(tmp_path, task), ArrayRecord({**g, **extras}), {"server-round": 1, "cohort": 2})
    state = reply.content["arrays"].to_torch_state_dict()
    assert float(state.pop("dp.clip")) == plan.clip_norm
    state.pop("dp.count")
    share = (flatten(state) - base) / (plan.server_lr * 2 / plan.expected_cohort)
    noise = plan.update_noise * plan.clip_norm / math.sqrt(2) * math.sqrt(base.size)  # the share's expected norm
    assert 0.8 * noise < np.linalg.norm(share) < 1.2 * noise + plan.clip_norm  # C=1e6 would give ~1e6 x this


@pytest.mark.parametrize(("carried", "count"), [(0.0, 0.0), (-1.0, 0.0), (1.0, -1e300)])
def test_an_adaptive_clip_norm_that_is_not_finite_and_positive_is_refused(tmp_path, carried, count):
    # Before: C=0 or C<0 raised a ConfigError traceback out of clip_update; a count of -1e300 an OverflowError in exp.
    task = _task(tmp_path, "privacy=none", "federated.dp=client", "federated.client_dp.adaptive=true",
                 "federated.client_dp.count_stddev=5")  # fmt: skip
    plan = client_level.make_plan(task.cfg.federated)
    assert client_checks.clip_norm(np.array([0.1, 0.0, 0.7]), 1, plan) == pytest.approx(0.7)  # an honest C moves on
    extras = {"dp.count": torch.tensor([count], dtype=torch.float64), "dp.clip": torch.tensor([carried]).double()}
    reply = _send(
        _client(tmp_path, task), ArrayRecord({**task.global_state(), **extras}), {"server-round": 1, "cohort": 2}
    )
    _refused(reply, "clip norm")
    assert _nothing_trained(tmp_path)


def test_a_replayed_round_cannot_spend_past_the_runs_rounds(tmp_path):
    # Before: with an explicit noise multiplier and no target epsilon (nothing else stops the ledger), a server that
    # sent rounds 1, 2, 3, 4, 2, 2 of a 2-round run had the client train all six: epsilon 7.27 against the 4.61
    # the run's admission planned.
    task = _task(tmp_path, "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "federated.rounds=1")
    app, g = _client(tmp_path, task), ArrayRecord(task.global_state())
    first = _send(app, g, {"server-round": 1, "cohort": 2}).content["metrics"]
    assert first["refused"] == 0 and first["steps"] > 0
    again = _send(app, g, {"server-round": 1, "cohort": 2}).content["metrics"]
    assert again["refused"] == 3  # "budget": nothing trained, nothing sent
    assert again["epsilon"] == pytest.approx(first["epsilon"])
    assert load_client_state(tmp_path / "clients", 0)["rounds"] == [1]


def test_under_ckks_a_bad_aggregate_is_refused_and_a_plaintext_global_never_downgrades_the_upload(tmp_path):
    task = _task(tmp_path, "privacy=none", "federated.aggregation=ckks")
    keys = generate_keys(CkksParams(), tmp_path / "client_keys", tmp_path / "server")
    app = _client(tmp_path, task, secret_context=str(keys.secret_context), secret_sha256=keys.secret_sha256)
    secret, base = load_secret_context(keys.secret_context), flatten(task.global_state())
    ok = {"server-round": 1}
    # Before: each of these raised out of the ClientApp (InvalidCiphertextError, unflatten's ValueError, the
    # overflow's ValueError).
    _refused(_send(app, ckks_record(b"AHE1" + bytes(40)), ok), "does not decrypt")
    _refused(_send(app, ckks_record(encrypt_update(np.append(base, [1.0, 2.0, 3.0]), 1, secret)), ok), "length")
    big = encrypt_update(np.full(base.size, 2.0**17), 1, secret)
    wrapped = aggregate([big] * 4, load_public_context(keys.public_context))
    _refused(_send(app, ckks_record(wrapped), ok), "overflowed")
    _refused(_send(app, ckks_record(b"junk"), ok, MessageType.EVALUATE), "does not decrypt")
    # A model the server encrypted under keys of its own making (same parameters): the client decrypts it with its
    # own key only, which turns it into noise of about q/2 and refuses it as an overflow.
    own = generate_keys(CkksParams(), tmp_path / "server_made", tmp_path / "server_made_public")
    forged = encrypt_update(base, 1, load_secret_context(own.secret_context))
    _refused(_send(app, ckks_record(forged), ok), "overflowed")
    assert _nothing_trained(tmp_path)
    # A plaintext model (the initial one travels so in round 1) does not make the client answer in plaintext.
    reply = _send(app, ArrayRecord(task.global_state()), ok)
    assert not reply.has_error() and set(reply.content["arrays"].keys()) == {"ckks"}
    assert ckks_payload(reply.content["arrays"]) is not None
    # A client of a CKKS run without a secret context refuses to upload at all (it would have sent plaintext).
    keyless = client_app.make_app(ClientSettings(job=str(tmp_path / "job.json"), state_dir=str(tmp_path / "k")), task)
    _refused(_send(keyless, ArrayRecord(task.global_state()), ok), "federated.aggregation=ckks", "no secret context")
    assert load_client_state(tmp_path / "k", 0) == {"ledger": None, "rounds": []}


def test_under_key_rotation_an_aggregate_naming_no_key_of_the_client_is_refused(tmp_path):
    # Before: a tag naming a key id the client does not hold raised FileNotFoundError out of the ClientApp, and an
    # untagged aggregate made it open the empty secret-context path (IsADirectoryError).
    task = _task(tmp_path, "privacy=none", "federated.aggregation=ckks", "federated.ckks.rotate_every=1")
    epoch = rotate_keys(CkksParams(), tmp_path / "client_keys", tmp_path / "server_keys", 0)
    app = _client(tmp_path, task, secret_root=str(tmp_path / "client_keys"))
    secret, base = load_secret_context(epoch.secret_context), flatten(task.global_state())
    update = encrypt_update(base, 1, secret)
    _refused(_send(app, ckks_record(tag(update, "ab" * 16)), {"server-round": 1}), "no epoch key", "abababab")
    _refused(_send(app, ckks_record(update), {"server-round": 1}), "without a key id")
    assert _nothing_trained(tmp_path)
    reply = _send(app, ckks_record(tag(update, epoch.key_id)), {"server-round": 1})  # its own epoch's: accepted
    assert not reply.has_error() and int(reply.content["metrics"]["refused"]) == 0


@pytest.mark.slow  # Flower's simulation engine (Ray start-up, ~30-60 s on 2 cores)
def test_a_malicious_server_app_gets_error_replies_and_the_clients_keep_serving(tmp_path):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from aisec_train.federated.strategy import wait_for_nodes

    task = _task(tmp_path, "privacy=none", "federated.dp=client")
    g = task.global_state()
    nan = _with(g, "conv1.weight", g["conv1.weight"].clone().fill_(math.nan))
    replies: dict[str, list[Message]] = {}
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        assert wait_for_nodes(grid, 2, 60.0) == 2
        nodes = sorted(grid.get_node_ids())

        def ask(arrays: ArrayRecord, config: dict, node: int) -> Message:
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
            return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)

        bad = [ask(nan, {"server-round": 1, "cohort": 2}, nodes[0]), ask(ArrayRecord(g), {"server-round": 1,
               "cohort": 10**9}, nodes[1])]  # fmt: skip
        replies["bad"] = list(grid.send_and_receive(bad, timeout=120))
        good = [ask(ArrayRecord(g), {"server-round": 1, "cohort": 2}, n) for n in nodes]
        replies["good"] = list(grid.send_and_receive(good, timeout=120))

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}}  # fmt: skip
    settings = ClientSettings(job=str(tmp_path / "job.json"), state_dir=str(tmp_path / "clients"))
    run_simulation(server_app=server, client_app=client_app.make_app(settings, task), num_supernodes=2,
                   backend_config=backend)  # fmt: skip
    reasons = sorted(_refused(r) for r in replies["bad"])
    assert "NaN" in reasons[0] and "cohort=1000000000" in reasons[1], reasons  # sorted: "...a global" < "...cohort"
    assert len(replies["good"]) == 2 and not any(r.has_error() for r in replies["good"])

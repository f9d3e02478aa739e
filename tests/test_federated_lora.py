"""Federated fine-tuning (issue 23, item 4): with ``model.trainable`` freezing part of the model, clients train and
send only the trainable tensors, the server aggregates only those (plaintext FedAvg or CKKS), and the frozen part
stays the checkpoint's weights bit for bit.

The fast tests run the real ClientApp (DP-SGD with Opacus on digits, real TenSEAL keys) and the real strategy on
real Flower messages, without an engine; the slow one runs the command line on Flower's simulation engine.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import aisec_train
from aisec_train.crypto import CkksParams, generate_keys
from aisec_train.crypto.ckks import EncryptedUpdate
from aisec_train.errors import ConfigError
from aisec_train.federated import client_app
from aisec_train.federated.client_keys import ClientKeys
from aisec_train.federated.settings import ClientSettings
from aisec_train.federated.strategy import SecureFedAvg, ckks_payload, load_state, state_to_record
from aisec_train.federated.task import FederatedTask, flatten, load_client_state, write_job
from aisec_train.federated.trainer import final_model
from tests.conftest import NodeGrid, read_report, run_cli

CLIENTS = 2


def _task(tmp_path, cnn_checkpoint, trainable: str, *extra: str) -> FederatedTask:
    cfg = aisec_train.compose(["federated=fedavg", f"federated.clients={CLIENTS}", "federated.local_epochs=1",
                               f"model.trainable={trainable}", f"model.checkpoint_path={cnn_checkpoint}",
                               "model.lora.r=2", "privacy.target_epsilon=8", *extra])  # fmt: skip
    path, digest = write_job(cfg, tmp_path / "job.json", manifest_sha256="test")
    return FederatedTask.from_job(str(path), digest)


def _round(task, strategy, settings, global_arrays: ArrayRecord, rnd: int = 1) -> tuple[ArrayRecord, list[Message]]:
    """One round: the strategy's messages answered by the real ClientApp, then aggregated."""
    app = client_app.make_app(settings, task)
    msgs = list(strategy.configure_train(rnd, global_arrays, ConfigRecord({}), NodeGrid(CLIENTS)))
    replies = []
    for pid, msg in enumerate(msgs):
        ctx = Context(run_id=7, node_id=pid + 1, node_config={"partition-id": pid}, state=RecordDict(), run_config={})
        replies.append(app(msg, ctx))
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return arrays, replies


@pytest.mark.parametrize("trainable", ["lora", "head"])
def test_only_trainable_tensors_travel_and_frozen_ones_stay_the_checkpoint_bit_for_bit(
    tmp_path, cnn_checkpoint, trainable, server_identity
):
    task = _task(tmp_path, cnn_checkpoint, trainable)
    full = task.initial_model().state_dict()
    keys = task.keys
    lora = {k for k in full if "lora_" in k}
    head = {"fc2.weight", "fc2.bias"}
    assert set(keys) == (lora | head if trainable == "lora" else head) and (lora or trainable == "head")
    start = task.global_state()
    strategy = SecureFedAvg(aggregation="plaintext", min_clients=CLIENTS, max_update_norm=1e6,
                            state_dir=tmp_path / "server")  # fmt: skip
    settings = ClientSettings(job=str(tmp_path / "job.json"), state_dir=str(tmp_path / "clients"))
    arrays, replies = _round(task, strategy, settings, ArrayRecord(start))
    assert all(int(r.content["metrics"]["refused"]) == 0 for r in replies)
    # Only the trainable keys travelled, in both directions, and the uploads are a fraction of the model.
    assert all(set(r.content["arrays"].keys()) == set(keys) for r in replies) and set(arrays.keys()) == set(keys)
    sent = sum(len(a.data) for a in replies[0].content["arrays"].values())
    whole = sum(len(a.data) for a in ArrayRecord(full).values())
    assert int(replies[0].content["metrics"]["upload-bytes"]) == sent and sent < whole / 3
    # The global model is the aggregate merged into the frozen base: frozen tensors are the checkpoint's.
    merged = task.global_model(arrays.to_torch_state_dict()).state_dict()
    saved = torch.load(cnn_checkpoint, weights_only=True)["model"]
    for name, value in merged.items():
        if name in keys:
            continue
        assert torch.equal(value, full[name]), f"frozen {name} moved"
        base = name.replace(".base_layer", "")
        if base in saved and not base.startswith("fc2."):
            assert torch.equal(value, saved[base]), f"{name} is not the checkpoint's"
    moved = [k for k in keys if not torch.equal(merged[k], start[k])]
    assert set(moved) >= ({k for k in keys if "lora_B" in k} | head)  # adapters and head trained (LoRA B from 0)
    # The server's round state holds the subset only; a resumed server starts from it.
    assert set(load_state(tmp_path / "server")["model"]["tensors"]) == set(keys)


def test_ckks_aggregation_of_the_subset_agrees_with_plaintext_fedavg(tmp_path, cnn_checkpoint, server_identity):
    # Without DP the local rounds are seeded and replayable (DP noise comes from OS entropy), so the two
    # aggregations below average the same local models.
    task = _task(tmp_path, cnn_checkpoint, "lora", "privacy=none")
    keys = generate_keys(CkksParams(), tmp_path / "client_keys", tmp_path / "server_ckks")
    start = ArrayRecord(task.global_state())
    plain = SecureFedAvg(aggregation="plaintext", min_clients=CLIENTS, max_update_norm=1e6,
                         state_dir=tmp_path / "server_plain")  # fmt: skip
    ckks = SecureFedAvg(aggregation="ckks", min_clients=CLIENTS, max_update_norm=1e6,
                        state_dir=tmp_path / "server_ckks", public_context=str(keys.public_context),
                        public_sha256=keys.public_sha256)  # fmt: skip
    plain_settings = ClientSettings(job=str(tmp_path / "job.json"), state_dir=str(tmp_path / "clients_plain"))
    ckks_settings = ClientSettings(job=str(tmp_path / "job.json"), state_dir=str(tmp_path / "clients_ckks"),
                                   secret_context=str(keys.secret_context),
                                   secret_sha256=keys.secret_sha256)  # fmt: skip
    plain_arrays, _ = _round(task, plain, plain_settings, start)
    ckks_arrays, ckks_replies = _round(task, ckks, ckks_settings, start)
    payload = ckks_payload(ckks_arrays)
    assert payload is not None and ckks_payload(plain_arrays) is None
    # The ciphertext carries the subset only: a client decrypts it into exactly the trainable tensors.
    decrypted = ClientKeys(ckks_settings).decrypt(payload)
    expected = flatten(plain_arrays.to_torch_state_dict())
    assert decrypted.size == expected.size == sum(v.numel() for v in task.global_state().values())
    np.testing.assert_allclose(decrypted, expected, atol=1e-4)
    assert np.abs(expected - flatten(task.global_state())).max() > 1e-3  # the round did move the subset
    # A CKKS upload carries ceil(subset / 2048 slots) ciphertexts (4096-degree ring); the whole model 19.
    update = EncryptedUpdate.from_bytes(ckks_payload(ckks_replies[0].content["arrays"]))
    assert update.length == decrypted.size and len(update.chunks) == math.ceil(decrypted.size / 2048) == 2
    assert int(ckks_replies[0].content["metrics"]["upload-bytes"]) == len(update.to_bytes())
    whole = sum(v.numel() for v in task.initial_model().state_dict().values())  # 37,532 with the adapters
    assert math.ceil(whole / 2048) == 19


def test_a_resumed_server_continues_from_the_saved_subset_and_the_final_model_merges_it(
    tmp_path, cnn_checkpoint, server_identity
):
    task = _task(tmp_path, cnn_checkpoint, "head")
    settings = ClientSettings(job=str(tmp_path / "job.json"), state_dir=str(tmp_path / "clients"))
    first = SecureFedAvg(aggregation="plaintext", min_clients=CLIENTS, max_update_norm=1e6,
                         state_dir=tmp_path / "server")  # fmt: skip
    after_one, _ = _round(task, first, settings, ArrayRecord(task.global_state()))
    # As server_app.main resumes: a new strategy, the saved round's subset as the global arrays.
    saved = load_state(tmp_path / "server")
    again = SecureFedAvg(aggregation="plaintext", min_clients=CLIENTS, max_update_norm=1e6,
                         state_dir=tmp_path / "server", round_offset=saved["round"],
                         history=saved["history"])  # fmt: skip
    after_two, _ = _round(task, again, settings, state_to_record(saved["model"]))
    state = load_state(tmp_path / "server")
    assert state["round"] == 2 and set(state["model"]["tensors"]) == {"fc2.weight", "fc2.bias"}
    one, two = after_one.to_torch_state_dict(), after_two.to_torch_state_dict()
    assert not torch.equal(one["fc2.weight"], two["fc2.weight"])
    final = final_model(task, settings, state).state_dict()
    initial = task.initial_model().state_dict()
    assert torch.equal(final["fc2.weight"], two["fc2.weight"])
    assert all(torch.equal(final[k], initial[k]) for k in initial if not k.startswith("fc2."))
    assert load_client_state(tmp_path / "clients", 0)["rounds"] == [1, 2]


def test_a_global_state_from_another_trainable_set_is_refused(tmp_path, cnn_checkpoint):
    task = _task(tmp_path, cnn_checkpoint, "head")
    other = {"fc1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="does not match model.trainable"):
        task.global_model(other)


@pytest.mark.slow  # one CLI run on Flower's simulation engine (Ray) with CKKS (~2 min on a loaded machine)
def test_cli_federated_lora_under_ckks_reports_bytes_against_the_whole_model(tmp_path, cnn_checkpoint):
    run_dir = tmp_path / "run"
    done = run_cli("experiment=federated_he", "model.trainable=lora", f"model.checkpoint_path={cnn_checkpoint}",
                   "model.lora.r=2", "audit=off", "robustness.evaluate=false", "federated.rounds=2",
                   "federated.ray_num_cpus=2", "federated.client_cpus=1", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = read_report(run_dir)
    fed = report["federated"]
    assert fed["trainable"] == "subset" and fed["trained_parameters"] == report["model"]["trainable_parameters"]
    assert fed["bytes_per_round"] < fed["bytes_per_round_full_model"] / 4
    assert report["model"]["lora_adapters"]["moved"] > 0
    # every SuperNode reads the checkpoint itself (the frozen base never crosses the wire): the job pins the bytes
    # this run loaded and reports, so a node holding another file refuses instead of training a mix
    job = json.loads((run_dir / "federated" / "job.json").read_text())
    pinned = hashlib.sha256(cnn_checkpoint.read_bytes()).hexdigest()
    assert job["config"]["model"]["checkpoint_sha256"] == pinned == report["model"]["checkpoint_sha256"]


def test_a_client_whose_checkpoint_differs_from_the_job_s_pin_refuses_to_build_the_model(tmp_path, cnn_checkpoint):
    other = tmp_path / "other.pt"
    other.write_bytes(cnn_checkpoint.read_bytes())  # the pinned bytes: builds
    pinned = hashlib.sha256(cnn_checkpoint.read_bytes()).hexdigest()
    task = _task(tmp_path, other, "head", f"model.checkpoint_sha256={pinned}")
    task.factory(seed=0)
    torch.save({"model": {k: v + 1 for k, v in torch.load(cnn_checkpoint, weights_only=True)["model"].items()}}, other)
    with pytest.raises(ConfigError, match=r"model.checkpoint_sha256 pins .*refusing changed weights"):
        _task(tmp_path, other, "head", f"model.checkpoint_sha256={pinned}").factory(seed=0)

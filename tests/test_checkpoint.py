"""Checkpoints: committed with a keyed tag, crash-consistent at every instant, verified before a weights-only load.

The kill drill forks a process that saves checkpoints in a loop and SIGKILLs it at random instants; after every kill
the checkpoint must load, complete, as the old or the new payload (never a refusal, never a mixed state).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import random
import signal
import time

import pytest
import torch

from aisec_train.store import artifacts
from aisec_train.train import checkpoint
from aisec_train.train.checkpoint import CheckpointError

FORK = multiprocessing.get_context("fork")


pytestmark = pytest.mark.usefixtures("keyed")  # a key and anchors of its own for each test (conftest.py)


def payload(i: int, n: int = 1000) -> dict:
    return {"epoch": i, "model": {"w": torch.full((n,), float(i))}, "history": [{"loss": 1.0 / (i + 1)}]}


def assert_complete(loaded: dict) -> int:
    i = loaded["epoch"]
    assert torch.all(loaded["model"]["w"] == float(i)) and loaded["history"] == [{"loss": 1.0 / (i + 1)}]
    return i


def test_round_trip_plain_torch_file_and_keyed_tag(tmp_path):
    path = tmp_path / "run" / "model.pt"
    digest = checkpoint.save(payload(3), path, root=tmp_path / "run")
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == checkpoint.recorded_hash(path)
    assert (path.parent / "model.pt.sha256").read_text() == f"{digest}  model.pt\n"  # `sha256sum -c` works
    assert torch.load(path, weights_only=True)["epoch"] == 3  # users torch.load model.pt themselves
    assert assert_complete(checkpoint.load(path)) == 3
    assert checkpoint.manifest(path)["meta"] == {"finite": True}
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt", "model.pt.sha256", "model.pt.tag"]


def test_tampering_of_each_kind_is_refused(tmp_path):
    path, other = tmp_path / "last.pt", tmp_path / "best.pt"
    checkpoint.save(payload(1), path)
    checkpoint.save(payload(9), other)
    good = path.read_bytes()

    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="refusing a tampered file"):
        checkpoint.load(path)

    torch.save(payload(0), path)  # an attacker's checkpoint, with the unkeyed sidecar recomputed
    (tmp_path / "last.pt.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  last.pt\n")
    with pytest.raises(CheckpointError, match="refusing a tampered file"):
        checkpoint.load(path)

    tag = json.loads((tmp_path / "last.pt.tag").read_text())  # ...and the manifest edited to accept it
    tag["accept"] = tag["accept"] + [hashlib.sha256(path.read_bytes()).hexdigest()]
    (tmp_path / "last.pt.tag").write_text(json.dumps(tag))
    with pytest.raises(CheckpointError, match="keyed tag does not verify"):
        checkpoint.load(path)

    path.write_bytes(other.read_bytes())  # a whole other checkpoint with its own (valid) tag
    (tmp_path / "last.pt.tag").write_bytes((tmp_path / "best.pt.tag").read_bytes())
    with pytest.raises(CheckpointError, match="vouches for 'best.pt', not 'last.pt'"):
        checkpoint.load(path)

    os.remove(tmp_path / "last.pt.tag")
    with pytest.raises(CheckpointError, match="has no keyed tag last.pt.tag; refusing an unverified"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "never.pt")


def test_a_checkpoint_under_a_swapped_key_is_refused(tmp_path, monkeypatch):
    checkpoint.save(payload(1), tmp_path / "c.pt")
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(tmp_path / "attacker.key"))
    with pytest.raises(CheckpointError, match="neither the current key"):
        checkpoint.load(tmp_path / "c.pt")


def test_symlinks_are_refused_on_save_and_load(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    (run / "checkpoints").symlink_to(outside)
    with pytest.raises(CheckpointError, match="checkpoints is a symlink; refusing to write through it"):
        checkpoint.save(payload(1), run / "checkpoints" / "last.pt", root=run)
    assert os.listdir(outside) == []
    checkpoint.save(payload(1), outside / "real.pt")
    (run / "model.pt").symlink_to(outside / "real.pt")
    (run / "model.pt.tag").symlink_to(outside / "real.pt.tag")
    with pytest.raises(CheckpointError, match="is a symlink; refusing to read through it"):
        checkpoint.load(run / "model.pt", root=run)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_in_a_checkpoint_is_not_executed_even_with_a_matching_hash(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        checkpoint.load(path, expected_sha256=checkpoint.sha256_file(path))
    checkpoint.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match="expected 0+: refusing a tampered checkpoint"):
        checkpoint.load(tmp_path / "ok.pt", expected_sha256="0" * 64)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"w": torch.ones(4)}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        checkpoint.save({"w": lambda: None}, path)  # not serialisable: fails mid-write
    assert torch.equal(checkpoint.load(path)["w"], torch.ones(4))
    assert {p.name for p in tmp_path.iterdir()} >= {"c.pt", "c.pt.sha256", "c.pt.tag"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_non_finite_weights_are_recorded_in_the_keyed_manifest(tmp_path):
    checkpoint.save({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "bad.pt")
    assert checkpoint.manifest(tmp_path / "bad.pt")["meta"] == {"finite": False}
    assert checkpoint.all_finite({"a": [torch.ones(2), (torch.arange(3),)]})
    assert not checkpoint.all_finite({"a": [torch.tensor([float("inf")])]})


@pytest.mark.parametrize("first", [True, False], ids=["first save", "over an old checkpoint"])
def test_a_crash_after_any_step_of_a_save_leaves_a_loadable_state(tmp_path, first):
    """Stop the commit after each durable step (what a kill at that instant leaves on disk)."""
    path = tmp_path / "c.pt"
    steps = list(artifacts.save_steps(path, lambda fh: torch.save(payload(1), fh), root=tmp_path))
    assert steps == ["staged", "manifest-pending", "payload", "manifest", "sha256"]
    for cut in range(len(steps) + 1):
        path = tmp_path / f"c{cut}.pt"
        if not first:
            checkpoint.save(payload(1), path)
        gen = artifacts.save_steps(path, lambda fh: torch.save(payload(2), fh), root=tmp_path)
        for _ in range(cut):
            next(gen)
        gen.close()  # the process dies here
        if first and not path.exists():
            continue  # the old state: no checkpoint yet
        assert assert_complete(checkpoint.load(path)) in ((1, 2) if not first else (2,))
        checkpoint.save(payload(3), path)  # and the next save after the crash commits cleanly
        assert assert_complete(checkpoint.load(path)) == 3


def _save_forever(path, root, start):
    torch.set_num_threads(1)
    rng = random.Random(start)
    i = start
    while True:
        i += 1
        checkpoint.save(payload(i, n=rng.choice([10, 50_000, 400_000])), path, root=root)


def test_kill_at_random_instants_always_leaves_the_old_or_the_new_checkpoint(tmp_path):
    run = tmp_path / "run"
    path = run / "checkpoints" / "last.pt"
    rng = random.Random(0)
    last, kills = 0, 24
    for _ in range(kills):
        child = FORK.Process(target=_save_forever, args=(path, run, last))
        child.start()
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        if not path.exists():
            assert last == 0  # killed before the very first commit: still the old state (nothing)
            continue
        i = assert_complete(checkpoint.load(path, root=run))  # never a refusal
        assert i >= last
        last = i
    assert last > kills  # the children did commit between kills
    checkpoint.save(payload(last + 1), path, root=run)  # a clean save after the crashes clears their debris
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_rotation_retags_a_checkpoint(tmp_path, keyed, monkeypatch):
    checkpoint.save(payload(5), tmp_path / "c.pt")
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(tmp_path / "keys" / "new.key"))
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(keyed))
    assert checkpoint.retag(tmp_path / "c.pt") is True and checkpoint.retag(tmp_path / "c.pt") is False
    monkeypatch.delenv("AISEC_TRAIN_OLD_KEY_FILES")
    assert assert_complete(checkpoint.load(tmp_path / "c.pt")) == 5


def test_meta_is_tagged_with_the_file_and_read_with_the_same_bytes(tmp_path):
    recipe = {"model": {"spec": {"_target_": "aisec_train.models.MLP"}, "num_classes": 3}}
    checkpoint.save(payload(4), tmp_path / "m.pt", meta=recipe)
    loaded, body = checkpoint.load_with_manifest(tmp_path / "m.pt")
    assert assert_complete(loaded) == 4 and body["meta"] == {**recipe, "finite": True}
    tag = json.loads((tmp_path / "m.pt.tag").read_text())
    tag["meta"]["model"]["spec"]["_target_"] = "os.system"  # the recipe cannot be edited without the key
    (tmp_path / "m.pt.tag").write_text(json.dumps(tag))
    with pytest.raises(CheckpointError, match="keyed tag does not verify"):
        checkpoint.load_with_manifest(tmp_path / "m.pt")

"""Checkpoints: atomic, hashed, verified before loading, and never a carrier for code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from aisec_train.train import checkpoint
from aisec_train.train.checkpoint import CheckpointError


def test_round_trip_and_hash_file(tmp_path):
    payload = {"model": {"w": torch.arange(6.0)}, "epoch": 3, "history": [{"loss": 0.5}]}
    digest = checkpoint.save(payload, tmp_path / "c.pt")
    assert (tmp_path / "c.pt.sha256").read_text().split()[0] == digest
    loaded = checkpoint.load(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"]) and loaded["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_tampered_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"w": torch.zeros(100)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="refusing a tampered checkpoint"):
        checkpoint.load(path)


def test_missing_hash_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"w": torch.zeros(3)}, path)
    os.remove(tmp_path / "c.pt.sha256")
    with pytest.raises(CheckpointError, match="unverified"):
        checkpoint.load(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_in_a_checkpoint_is_not_executed_even_with_a_matching_hash(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        checkpoint.load(path, expected_sha256=checkpoint.sha256_file(path))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"w": torch.ones(4)}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        checkpoint.save({"w": lambda: None}, path)  # not serialisable: fails mid-write
    assert torch.equal(checkpoint.load(path)["w"], torch.ones(4))
    assert {p.name for p in tmp_path.iterdir()} == {"c.pt", "c.pt.sha256"}

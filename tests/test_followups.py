"""Follow-ups of the anchor and data-layout work: record sets are anchored like ledgers (an anchor written before
the first write, required on read, crash-safe, re-anchored knowingly); a monitoring batch and a trusted set are read
in the layout the model takes; the budget-stop line says where in the run the stop fell."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aisec_train.audit import monitor
from aisec_train.backdoor.trusted import load_trusted
from aisec_train.data.arrays import ArrayDataset
from aisec_train.data.dataset import DataBundle
from aisec_train.data.errors import DataError
from aisec_train.privacy import LedgerStore
from aisec_train.privacy.record_sets import RecordSets
from aisec_train.report.budget_text import stop_line
from aisec_train.store import anchors
from aisec_train.store.errors import BudgetError, IntegrityError

pytestmark = pytest.mark.usefixtures("keyed")  # a key and anchor folder of its own for each test (conftest.py)

DS = hashlib.sha256(b"follow-ups").hexdigest()


def digests(start: int, stop: int) -> np.ndarray:
    """Record digests ``start``..``stop`` (16 bytes each, distinct)."""
    return np.array([hashlib.md5(str(i).encode()).digest() for i in range(start, stop)], dtype="V16")


@pytest.fixture
def grown(tmp_path) -> tuple[LedgerStore, RecordSets, Path, bytes, bytes]:
    """A record set of 10 records copied aside, then grown to 30: (store, sets, its file, older copy, newer)."""
    store = LedgerStore(tmp_path / "store")
    sets = RecordSets(store.path)
    with store.open(DS) as led:
        sets.add(led, digests(0, 10))
    path = sets.path(DS)
    older = path.read_bytes()
    with store.open(DS) as led:
        sets.add(led, digests(10, 30))
    assert len(sets.load(DS)) == 30
    return store, sets, path, older, path.read_bytes()


def summary(raw: bytes) -> dict:
    body = raw.split(b"\n", 2)[2]
    return {"n": len(body) // 16, "sha256": hashlib.sha256(body).hexdigest()}


# -- 1. record sets: the anchor is required ----------------------------------------------------------------------
def test_an_older_record_set_with_its_anchor_deleted_is_refused(grown):
    """The gap: a set cut back to an older copy with its anchor file deleted was accepted (a set of 10, its 20
    newer records' spend through other datasets forgotten)."""
    store, sets, path, older, _ = grown
    path.write_bytes(older)
    anchors.anchor_path(path).unlink()
    with pytest.raises(IntegrityError, match=r"holds 10 record digest\(s\) but has no anchor") as err:
        sets.load(DS)
    assert f"aisec-train-ledger anchor {DS[:16]} --why TEXT" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(IntegrityError, match="has no anchor"), store.open(DS) as led:  # and no run adds to it
        sets.add(led, digests(0, 5))
    assert path.read_bytes() == older


def test_a_record_set_is_anchored_before_its_first_write(tmp_path):
    """``begin`` before the first set lands: the kill between the two leaves "nothing yet", which accepts the set
    (or its absence); the next registration makes the anchor final, so the set can no longer be deleted."""
    store = LedgerStore(tmp_path / "store")
    sets = RecordSets(store.path)
    path = sets.path(DS)
    anchors.begin(path)  # the state a kill leaves before the first set landed: no file, an anchor at -1
    assert len(sets.load(DS)) == 0 and DS in sets.datasets()
    with store.open(DS) as led:
        sets.add(led, digests(0, 10))
    assert anchors.read_anchor(path)["seq"] == 0
    # a kill after the first set landed, before its anchor moved: the anchor is still at -1
    anchors.anchor_path(path).unlink()
    anchors.begin(path)
    assert len(sets.load(DS)) == 10
    with store.open(DS) as led:
        sets.add(led, digests(0, 10))  # nothing new: the unfinished anchor is made final all the same
    assert anchors.read_anchor(path)["seq"] == 0
    path.unlink()
    with pytest.raises(IntegrityError, match="is missing but its anchor"):
        sets.load(DS)


def test_a_kill_while_a_record_set_grows_leaves_a_set_that_opens(grown):
    """Growing a set writes an anchor for "the old or the new set" first: either state a kill leaves opens (the
    new one was refused before: its anchor still named the old set), no third set does, and the next registration
    makes the anchor final."""
    store, sets, path, older, newer = grown
    anchors.write_replacing(path, summary(older), summary(newer))  # the anchor a kill mid-write leaves
    assert len(sets.load(DS)) == 30  # the new set landed, its final anchor did not
    path.write_bytes(older)
    assert len(sets.load(DS)) == 10  # the new set never landed
    path.write_bytes(newer)
    with store.open(DS) as led:
        sets.add(led, digests(0, 30))  # nothing new: the anchor becomes the new set's alone
    assert "next" not in anchors.read_anchor(path)
    path.write_bytes(older)
    with pytest.raises(IntegrityError, match=r"holds 10 record digest\(s\) but its anchor .* records another set"):
        sets.load(DS)


def test_a_record_set_is_re_anchored_knowingly_and_on_record(grown, tmp_path, monkeypatch):
    store, sets, path, older, _ = grown
    path.write_bytes(older)  # e.g. a store restored from a backup older than the anchors
    with pytest.raises(IntegrityError, match="records another set of 30"):
        sets.load(DS)
    with store.open(DS) as led:
        for bad in ("", "two\nlines", "x" * 1000):
            with pytest.raises(BudgetError, match="--why"):
                sets.reanchor(led, why=bad)
        record = sets.reanchor(led, why="restored from the nightly backup")
        with pytest.raises(IntegrityError, match="nothing to re-anchor"):
            sets.reanchor(led, why="again")
    assert len(sets.load(DS)) == 10
    assert record["kind"] == "anchor" and record["records"] == 10 and record["previous"] == 30
    why = "record set of 10 record digest(s) (was an anchor of another set): restored from the nightly backup"
    assert record["why"] == why
    assert store.view(DS).records[-1] == record  # on the dataset's ledger, which still verifies
    anchors.anchor_path(path).unlink()  # an anchor lost altogether
    with store.open(DS) as led:
        assert sets.reanchor(led, why="anchor file lost")["previous"] is None
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(tmp_path / "fresh"))
    with pytest.raises(IntegrityError, match="is not the one key"), store.open(DS) as led:
        sets.reanchor(led, why="a fresh folder")


def test_a_key_rotation_re_tags_record_sets_too(grown, keyed, monkeypatch):
    """Before, ``retag`` re-tagged the ledgers alone: once the old key was dropped, every record set (and so every
    run on the store, which reads them all) was refused as tagged under an unknown key."""
    store, sets, path, _, newer = grown
    new_key = keyed.with_name("new.key")
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(new_key))
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(keyed))
    with store.open(DS) as led:
        assert sets.retag(led) is True
        assert sets.retag(led) is False  # already under the new key
    assert path.read_bytes() != newer and len(sets.load(DS)) == 30
    monkeypatch.delenv("AISEC_TRAIN_OLD_KEY_FILES")
    assert len(sets.load(DS)) == 30  # the set and its anchor verify under the new key alone
    with store.open(DS) as led:
        assert len(sets.add(led, digests(25, 40))) == 40


# -- 2. a monitoring batch and a trusted set read in the model's layout ------------------------------------------
INPUT = (3, 3, 6)  # C, H, W: stored N,H,W,C it is (N, 3, 6, 3), which the layout rule calls ambiguous


def hand_made_run(run_dir: Path) -> torch.Tensor:
    """A run folder as the pipeline leaves it for a model taking (3, 3, 6) images; returns its held-out inputs."""
    from aisec_train.config import MonitorConfig
    from aisec_train.models import ModelFactory
    from aisec_train.train import checkpoint

    factory = ModelFactory({"_target_": "tests.userland.TinyResNet", "width": 4}, input_shape=INPUT, num_classes=3)
    model = factory(seed=3).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint.save(state, run_dir / "model.pt", root=run_dir, meta={"model": monitor.recipe(factory)})
    x = torch.rand(60, *INPUT, generator=torch.Generator().manual_seed(0))
    meta = {"target": factory.target, "input_shape": list(INPUT), "num_classes": 3}
    baseline = monitor.build_baseline(model, x[:20], x[20:40], model_meta=meta, cfg=MonitorConfig())
    (run_dir / monitor.BASELINE).write_text(json.dumps(baseline))
    return x[40:]


def monitor_cli(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        monitor.main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_a_monitor_batch_is_read_in_the_layout_the_model_takes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = hand_made_run(run_dir)
    nhwc = held.permute(0, 2, 3, 1).numpy()  # (20, 3, 6, 3): ambiguous by shape alone
    np.savez(tmp_path / "nhwc.npz", x=nhwc)
    code, out, err = monitor_cli(capsys, run_dir, tmp_path / "nhwc.npz")
    assert code in (0, 1) and out.startswith(("OK: 20 inputs", "ALARM: 20 inputs")) and err == "", (out, err)
    assert monitor.expected_shape(run_dir) == INPUT
    read = monitor.read_batch(tmp_path / "nhwc.npz", expect=INPUT)
    assert torch.equal(read, held)  # each pixel where it was, not 3 channels of 6x3
    # a shape neither layout turns into the model's input: one line naming both readings and the model's shape
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 5, 3), np.float32))
    code, out, err = monitor_cli(capsys, run_dir, tmp_path / "wrong.npz")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "neither N,C,H,W (3 channel(s) of 5x3) nor N,H,W,C (3 channel(s) of 3x5)" in err and "(3, 3, 6)" in err


def bundle(input_shape: tuple[int, int, int]) -> DataBundle:
    x = np.random.default_rng(0).random((12, *input_shape), dtype=np.float32)
    y = np.arange(12) % 3
    train = ArrayDataset(x, y)
    return DataBundle("npz", train, train, 3, input_shape, {})


def test_a_trusted_set_is_read_in_the_layout_the_model_takes(tmp_path):
    data = bundle(INPUT)
    x = np.random.default_rng(1).random((9, *INPUT), dtype=np.float32)
    np.savez(tmp_path / "trusted.npz", x=x.transpose(0, 2, 3, 1), y=np.arange(9) % 3)  # N,H,W,C: (9, 3, 6, 3)
    sample = load_trusted(str(tmp_path / "trusted.npz"), data)
    assert torch.equal(sample.x, torch.from_numpy(x))
    np.savez(tmp_path / "nchw.npz", x=x, y=np.arange(9) % 3)  # (9, 3, 3, 6): clear by shape, still read
    assert torch.equal(load_trusted(str(tmp_path / "nchw.npz"), data).x, torch.from_numpy(x))
    np.savez(tmp_path / "wrong.npz", x=np.zeros((9, 3, 5, 3), np.float32), y=np.arange(9) % 3)
    with pytest.raises(DataError, match=r"neither N,C,H,W .* nor N,H,W,C .* gives the model's input") as err:
        load_trusted(str(tmp_path / "wrong.npz"), data)
    assert "\n" not in str(err.value)


# -- 3. the budget-stop line -------------------------------------------------------------------------------------
def report(steps: int, epochs_completed: int, epochs: int = 6, rate: float = 0.1) -> SimpleNamespace:
    return SimpleNamespace(
        sections={
            "train": {"stopped_by_budget": True, "epochs_completed": epochs_completed, "epochs_planned": epochs},
            "privacy": {"steps": steps, "sample_rate": rate, "epsilon": 2.0, "target_epsilon": 2.0},
        }
    )


def test_the_stop_line_says_where_in_the_run_the_budget_stopped_it():
    inside = stop_line(report(55, 6))  # 10 steps an epoch: 5 epochs and 5 steps of the sixth
    assert "of 6 planned epochs" not in inside
    assert "after 55 step(s) (of 60 planned step(s), 10 an epoch: stopped 5 step(s) into epoch 6 of 6, " in inside
    assert "5 epoch(s) complete; epsilon 2.000 of the run's target 2.0)" in inside
    boundary = stop_line(report(30, 4))  # the loop counts the fourth epoch, stopped before its first step
    assert "3 of 6 planned epoch(s) complete, stopped before epoch 4 began" in boundary
    assert "stopped before epoch 1 began" in stop_line(report(0, 0))
    unknown = stop_line(report(55, 6, rate=None))  # no sample rate to count by
    assert "after 55 step(s) (in epoch 6 of 6 planned; epsilon" in unknown
    assert stop_line(SimpleNamespace(sections={"train": {"stopped_by_budget": False}})) is None

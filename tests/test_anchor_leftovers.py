"""Ledger anchors: an emptied, deleted or fresh anchor folder does not accept a cut-back ledger (docs/integrity.md,
"Anchors"); re-anchoring a trusted ledger is a recorded act of `aisec-train-ledger anchor`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from aisec_train.privacy import LedgerStore, ledger_cli
from aisec_train.privacy.record_sets import RecordSets
from aisec_train.store import anchors
from aisec_train.store.errors import IntegrityError
from tests.conftest import read_report, run_cli

DS = hashlib.sha256(b"anchor leftovers").hexdigest()
RUN = {"delta": 1e-5, "accountant": "rdp", "sample_rate": 0.01, "noise_multiplier": 1.1, "split_seed": 0}

pytestmark = pytest.mark.usefixtures("keyed")  # a key and anchors of its own for each test (conftest.py)


def spend(store: LedgerStore, run_id: str, steps: int) -> None:
    with store.open(DS) as led:
        led.begin_run(run_id, **RUN, target_epsilon=3.0, n_train=1437)
        led.charge(run_id, [(1.1, 0.01, steps)])


@pytest.fixture
def cut_back(tmp_path) -> tuple[LedgerStore, Path, bytes]:
    """A ledger of 100 steps copied aside, then 400 more spent: (store, ledger file, the older copy)."""
    store = LedgerStore(tmp_path / "ledgers")
    spend(store, "runs/a", 100)
    path = store.path / f"{DS}.json"
    older = path.read_bytes()
    spend(store, "runs/b", 400)
    assert store.view(DS).steps() == 500
    return store, path, older


def cli(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        ledger_cli.main([str(a) for a in args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def refused(result: tuple[int, str, str], *needles: str) -> str:
    code, _, err = result
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("aisec-train-ledger: error: ") and all(n in err for n in needles), err
    return err


# -- the attack -------------------------------------------------------------------------------------------------
def test_an_older_copy_with_a_fresh_anchor_folder_is_refused(cut_back, tmp_path, monkeypatch):
    store, path, older = cut_back
    path.write_bytes(older)
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(tmp_path / "fresh_anchors"))  # the attacker's own job's env
    with pytest.raises(IntegrityError, match="is not the one key .* is bound to") as err:
        _ = store.view(DS).records
    assert "\n" not in str(err.value) and str(tmp_path / "keys" / "anchors") in str(err.value)
    with pytest.raises(IntegrityError, match="is not the one key"):  # nor can a job on it start
        with store.open(DS):
            pass
    assert not (tmp_path / "fresh_anchors").exists()  # refused before anything was written there


def test_an_emptied_or_deleted_anchor_folder_is_refused(cut_back, tmp_path):
    store, path, older = cut_back
    path.write_bytes(older)
    folder = tmp_path / "keys" / "anchors"
    for entry in folder.iterdir():
        entry.unlink()  # emptied
    with pytest.raises(
        IntegrityError, match="has lost the .anchor-dir marker key .* is bound to: it was emptied, deleted or replaced"
    ):
        _ = store.view(DS).records
    shutil.rmtree(folder)  # deleted
    with pytest.raises(IntegrityError, match="has lost the .anchor-dir marker"):
        with store.open(DS):
            pass
    path.unlink()  # the ledger deleted too: still no fresh budget while the key is bound to its anchors
    with pytest.raises(IntegrityError, match="has lost the .anchor-dir marker"):
        with store.open(DS):
            pass


def test_a_ledger_with_records_but_no_anchor_is_refused(cut_back):
    """The anchor folder kept (its marker too), only this ledger's anchor removed: an older copy is refused."""
    store, path, older = cut_back
    path.write_bytes(older)
    anchors.anchor_path(path).unlink()
    with pytest.raises(IntegrityError) as err:
        _ = store.view(DS).records
    line = str(err.value)
    assert "holds 3 record(s) but has no anchor" in line and f"aisec-train-ledger anchor {DS[:16]} --why" in line
    assert "\n" not in line


def test_a_fresh_key_listing_the_bound_one_as_old_does_not_escape_the_binding(cut_back, tmp_path, monkeypatch):
    store, path, older = cut_back
    path.write_bytes(older)
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(tmp_path / "keys" / "hmac.key"))
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(tmp_path / "attacker" / "hmac.key"))
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(tmp_path / "attacker" / "anchors"))
    with pytest.raises(IntegrityError, match="is not the one key .*keys/hmac.key is bound to"):
        with store.open(DS):
            pass


def test_a_forged_binding_is_refused(cut_back, tmp_path, monkeypatch):
    store, _, _ = cut_back
    binding = anchors.binding_path(tmp_path / "keys" / "hmac.key")
    body = json.loads(binding.read_text()) | {"anchor_dir": str(tmp_path / "fresh")}
    binding.write_text(json.dumps(body))
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(tmp_path / "fresh"))
    with pytest.raises(IntegrityError, match="does not verify under the key beside it"):
        _ = store.view(DS).records


def test_record_sets_are_held_to_the_bound_anchor_folder(tmp_path, monkeypatch):
    import numpy as np

    store = LedgerStore(tmp_path / "ledgers")
    sets = RecordSets(store.path)
    with store.open(DS) as led:
        sets.add(led, np.frombuffer(bytes(range(32)), dtype="V16"))
    assert len(sets.load(DS)) == 2
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(tmp_path / "fresh_anchors"))
    with pytest.raises(IntegrityError, match="is not the one key"):
        sets.load(DS)


# -- what keeps working -------------------------------------------------------------------------------------------
def test_a_kill_between_the_first_record_and_its_anchor_leaves_a_ledger_that_opens(tmp_path):
    """The state a kill leaves after the first record landed but before its anchor moved: the anchor ``begin``
    wrote (sequence -1) accepts it, and the next commit anchors it."""
    store = LedgerStore(tmp_path / "ledgers")
    spend(store, "runs/a", 10)
    path = store.path / f"{DS}.json"
    anchors.anchor_path(path).unlink()
    anchors.begin(path)  # what stood before the first record landed
    assert json.loads(anchors.anchor_path(path).read_text())["seq"] == -1
    assert store.view(DS).steps() == 10
    spend(store, "runs/b", 5)
    assert json.loads(anchors.anchor_path(path).read_text())["seq"] == len(store.view(DS).records) - 1
    # and a ledger that never landed: the early anchor accepts its absence (nothing was recorded)
    other = LedgerStore(tmp_path / "other")
    anchors.begin(other.path / f"{DS}.json")
    assert other.view(DS).records == []


def test_moving_the_anchor_folder_is_the_key_owners_act(cut_back, tmp_path, monkeypatch):
    store, path, _ = cut_back
    moved = tmp_path / "shared" / "anchors"
    moved.parent.mkdir()
    shutil.move(tmp_path / "keys" / "anchors", moved)
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(moved))
    with pytest.raises(IntegrityError, match="is not the one key"):
        _ = store.view(DS).records
    anchors.binding_path(tmp_path / "keys" / "hmac.key").unlink()  # the key owner re-binds (docs/integrity.md)
    assert store.view(DS).steps() == 500
    spend(store, "runs/c", 1)  # the next write binds the key to the moved folder (its marker kept)
    assert json.loads(anchors.binding_path(tmp_path / "keys" / "hmac.key").read_text())["anchor_dir"] == str(moved)


def test_reanchor_is_a_recorded_act_of_the_ledger_command(cut_back, capsys, monkeypatch):
    store, path, older = cut_back
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(store.path))
    path.write_bytes(older)  # e.g. restored from a backup older than its anchor
    refused(cli(capsys, "verify", DS), "failed verification")
    before = path.read_bytes()
    for bad in ("", "two\nlines", "x" * 201):
        refused(cli(capsys, "anchor", DS, "--why", bad), "--why")
    refused(cli(capsys, "anchor", "ffff" * 16, "--why", "typo"), "no ledger for dataset", "nothing to anchor")
    refused(cli(capsys, "anchor", DS, "--why", "ok", "--wait", "nan"), "--wait")
    assert path.read_bytes() == before  # bad input changed nothing
    code, out, _ = cli(capsys, "anchor", DS[:8], "--why", "restored from the 1 May backup, ticket 9")
    assert code == 0 and "re-anchored dataset" in out and "at 3 record(s) (was an anchor of 5 record(s)" in out
    led = store.view(DS)
    assert led.steps() == 100 and led.records[-1]["kind"] == "anchor" and led.records[-1]["previous"] == 5
    code, out, _ = cli(capsys, "show", DS)
    assert code == 0 and "re-anchored at 3 record(s) (was an anchor of 5 record(s))" in out
    assert "restored from the 1 May backup" in out
    refused(cli(capsys, "anchor", DS, "--why", "again"), "is anchored and verifies", "nothing to re-anchor")
    # a lost anchor (no anchor at all) the same way
    anchors.anchor_path(path).unlink()
    refused(cli(capsys, "show", DS), "has no anchor")
    code, out, _ = cli(capsys, "anchor", DS, "--why", "anchor lost with a disk")
    assert code == 0 and "(was no anchor; recorded)" in out


def test_reanchor_refuses_a_fresh_anchor_folder(cut_back, tmp_path, capsys, monkeypatch):
    store, path, older = cut_back
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(store.path))
    path.write_bytes(older)
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(tmp_path / "fresh_anchors"))
    refused(cli(capsys, "anchor", DS, "--why", "attacker"), "is not the one key")
    assert path.read_bytes() == older and not (tmp_path / "fresh_anchors").exists()


@pytest.mark.slow
def test_a_job_on_a_cut_back_ledger_with_a_fresh_anchor_folder_is_refused(tmp_path):
    """The whole attack through the command line: two DP jobs spend, the ledger is put back to its copy after the
    first, and a third job (its own $AISEC_TRAIN_ANCHOR_DIR fresh) is refused in one line before any step."""
    env = {
        "AISEC_TRAIN_LEDGER_STORE": str(tmp_path / "ledgers"),
        "AISEC_TRAIN_KEY_FILE": str(tmp_path / "keys" / "hmac.key"),
        "AISEC_TRAIN_ANCHOR_DIR": str(tmp_path / "keys" / "anchors"),
        "AISEC_TRAIN_REGISTRY": str(tmp_path / "registry.json"),
    }
    job = [
        "experiment=smoke",
        "train.epochs=1",
        "privacy.noise_multiplier=5.0",
        "audit=off",
        "robustness.evaluate=false",
    ]
    first = run_cli(*job, f"hydra.run.dir={tmp_path / 'a'}", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    (ledger,) = (tmp_path / "ledgers").glob("*.json")
    older = ledger.read_bytes()
    second = run_cli(*job, f"hydra.run.dir={tmp_path / 'b'}", env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    ledger.write_bytes(older)
    attack = run_cli(*job, f"hydra.run.dir={tmp_path / 'c'}", env=env | {"AISEC_TRAIN_ANCHOR_DIR": str(tmp_path / "x")})
    lines = [line for line in attack.stderr.splitlines() if line.strip()]
    assert attack.returncode == 2 and len(lines) == 1 and "is not the one key" in lines[0], attack.stderr[-2000:]
    assert not (tmp_path / "c" / "model.pt").exists() and not (tmp_path / "x").exists()
    assert ledger.read_bytes() == older  # nothing was charged to the cut-back ledger
    assert read_report(tmp_path / "b")["privacy"]["epsilon"] > 0

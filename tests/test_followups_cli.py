"""aisec-train-ledger anchor and retag reach record sets too (the follow-up of the anchor binding)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from aisec_train.privacy import LedgerStore, ledger_cli
from aisec_train.privacy.record_sets import RecordSets
from aisec_train.store import anchors

pytestmark = pytest.mark.usefixtures("keyed")
DS = hashlib.sha256(b"wiring").hexdigest()
RUN = {"delta": 1e-5, "accountant": "rdp", "sample_rate": 0.01, "noise_multiplier": 1.1, "split_seed": 0}


def cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        ledger_cli.main([str(a) for a in args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_anchor_command_re_anchors_a_record_set(tmp_path, capsys):
    store = LedgerStore(tmp_path / "s")
    sets = RecordSets(store.path)

    def d(a, b):
        return np.array([hashlib.md5(str(i).encode()).digest() for i in range(a, b)], dtype="V16")

    with store.open(DS) as led:
        led.begin_run("r", **RUN, target_epsilon=3.0, n_train=100)
        sets.add(led, d(0, 10))
    older = sets.path(DS).read_bytes()
    with store.open(DS) as led:
        sets.add(led, d(10, 30))
    sets.path(DS).write_bytes(older)
    code, out, err = cli(capsys, "--store", store.path, "verify")
    assert code == 2 and "FORGED" in out and "records another set of 30" in out, out
    code, out, err = cli(capsys, "--store", store.path, "anchor", DS[:8], "--why", "restored")
    assert (
        code == 0
        and "re-anchored the record set of dataset" in out
        and "at 10 record digest(s) (was an anchor of 30)" in out
    ), (out, err)
    code, out, err = cli(capsys, "--store", store.path, "verify")
    assert code == 0 and "record set of 10" in out, out
    code, out, err = cli(capsys, "--store", store.path, "anchor", DS[:8], "--why", "again")
    assert code == 2 and "nothing to re-anchor" in err
    code, out, err = cli(capsys, "--store", store.path, "show", DS[:8])
    assert (
        "re-anchored at 10 record(s) (was an anchor of 30 record(s))" in out
        and "record set of 10 record digest(s)" in out
    ), out
    # ledger and set both lost their anchors: both re-anchored by one call
    anchors.anchor_path(sets.path(DS)).unlink()
    anchors.anchor_path(store.path / f"{DS}.json").unlink()
    code, out, err = cli(capsys, "--store", store.path, "anchor", DS[:8], "--why", "lost disk")
    assert code == 0 and out.count("re-anchored") == 2, (out, err)
    code, out, err = cli(capsys, "--store", store.path, "verify")
    assert code == 0, out


def test_retag_re_tags_record_sets(tmp_path, capsys, keyed, monkeypatch):
    store = LedgerStore(tmp_path / "s")
    sets = RecordSets(store.path)
    with store.open(DS) as led:
        led.begin_run("r", **RUN, target_epsilon=3.0, n_train=100)
        sets.add(led, np.array([hashlib.md5(str(i).encode()).digest() for i in range(10)], dtype="V16"))
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(keyed.with_name("new.key")))
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(keyed))
    from aisec_train.store import keys

    keys.current_key()
    code, out, err = cli(capsys, "--store", store.path, "retag")
    assert code == 0 and "re-tagged its record set" in out, (out, err)
    monkeypatch.delenv("AISEC_TRAIN_OLD_KEY_FILES")
    code, out, err = cli(capsys, "--store", store.path, "verify")
    assert code == 0 and "record set of 10" in out, (out, err)

"""aisec_train.store: keyed tags, key custody, safe writes, locks between real processes, the privacy ledger store.

Every forgery is made the way an attacker with write access to the outputs (but not to the key) would make it.
Processes are forked (not spawned) so each contention test costs milliseconds, not a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from aisec_train.errors import ConfigError
from aisec_train.privacy import LedgerStore, compose_epsilon
from aisec_train.store import (
    BudgetError,
    IntegrityError,
    LockError,
    atomic_write,
    exclusive_lock,
    keys,
    safe_open_for_write,
    tag,
    validate_output_path,
    verify,
)
from aisec_train.store import anchors as anchors_mod

FORK = multiprocessing.get_context("fork")
DS = hashlib.sha256(b"a dataset manifest").hexdigest()
RUN = {"delta": 1e-5, "accountant": "rdp", "sample_rate": 0.01, "noise_multiplier": 1.1, "split_seed": 0}


pytestmark = pytest.mark.usefixtures("keyed")  # a key and anchors of its own for each test (conftest.py)


def begin(led, run_id="r1", target_epsilon=3.0, **over):
    return led.begin_run(run_id, **{**RUN, **over}, target_epsilon=target_epsilon, n_train=1000)


def ledger_with_runs(store_dir: Path) -> LedgerStore:
    store = LedgerStore(store_dir)
    with store.open(DS) as led:
        begin(led, "r1")
        for _ in range(3):
            led.charge("r1", [(1.1, 0.01, 50)])
        begin(led, "r2")
        led.charge("r2", [(1.1, 0.01, 20)])
    return store


def edit_ledger(store: LedgerStore, change) -> None:
    path = store.path / f"{DS}.json"
    body = json.loads(path.read_text())
    change(body["records"])
    path.write_text(json.dumps(body))


# -- keys ------------------------------------------------------------------------------------------------------
def _key_id(queue):
    queue.put(keys.current_key().id)


def test_key_is_created_once_private_and_race_safe(keyed):
    queue = FORK.Queue()
    procs = [FORK.Process(target=_key_id, args=(queue,)) for _ in range(6)]
    for p in procs:
        p.start()
    ids = {queue.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(ids) == 1 and ids == {keys.current_key().id}  # six racing creators, one key
    assert oct(os.stat(keyed).st_mode & 0o777) == "0o600"
    assert sorted(os.listdir(keyed.parent)) == ["hmac.key"]  # no temp file left behind


def test_unsafe_key_files_are_refused(keyed, tmp_path):
    keys.current_key()
    os.chmod(keyed, 0o640)
    with pytest.raises(IntegrityError, match=r"has mode 0640; only its owner may access it"):
        tag(b"x", "ledger")
    os.chmod(keyed, 0o600)
    real = tmp_path / "real.key"
    os.rename(keyed, real)
    os.symlink(real, keyed)
    with pytest.raises(IntegrityError, match="must not be a symlink"):
        tag(b"x", "ledger")
    os.unlink(keyed)
    keyed.write_text("too short\n")
    os.chmod(keyed, 0o600)
    with pytest.raises(IntegrityError, match="must hold at least 32 random bytes as hex"):
        tag(b"x", "ledger")


def test_tags_are_purpose_separated_and_bound_to_the_key(keyed, tmp_path, monkeypatch):
    t = tag(b"payload", "ledger")
    verify(b"payload", t, "ledger", what="x")
    with pytest.raises(IntegrityError, match="does not verify"):
        verify(b"payload", t, "checkpoint", what="x")  # a ledger tag is not a checkpoint tag
    with pytest.raises(IntegrityError, match="does not verify"):
        verify(b"payload!", t, "ledger", what="x")
    with pytest.raises(IntegrityError, match="has no valid keyed tag"):
        verify(b"payload", hashlib.sha256(b"payload").hexdigest(), "ledger", what="x")  # an unkeyed hash
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(tmp_path / "other.key"))  # a swapped key
    with pytest.raises(IntegrityError, match="neither the current key"):
        verify(b"payload", t, "ledger", what="x")
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(keyed))  # rotation: the old key is verify-only
    verify(b"payload", t, "ledger", what="x")
    assert not keys.is_current(t) and keys.is_current(tag(b"payload", "ledger"))


# -- safe writes -----------------------------------------------------------------------------------------------
def test_writes_never_follow_a_planted_symlink(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    (run / "sub").mkdir(parents=True)
    outside.mkdir()
    (run / "report.json").symlink_to(outside / "victim.json")
    (run / "checkpoints").symlink_to(outside)
    with pytest.raises(IntegrityError, match=r"run/report.json is a symlink; refusing to write through it"):
        atomic_write(run / "report.json", "{}", root=run)
    with pytest.raises(IntegrityError, match=r"run/checkpoints is a symlink; refusing to write through it"):
        atomic_write(run / "checkpoints" / "last.pt", b"x", root=run)
    with pytest.raises(IntegrityError, match="is outside"):
        atomic_write(run / ".." / "escape.txt", "x", root=run)
    with pytest.raises(IntegrityError, match="symlink"):
        with safe_open_for_write(run / "report.json", root=run, mode="w") as fh:
            fh.write("never")
    with pytest.raises(IntegrityError, match="audit.registry_path: .* is a symlink"):
        validate_output_path(run / "report.json", what="audit.registry_path")
    (tmp_path / "ledgers").mkdir()
    (tmp_path / "ledgers" / f"{DS}.json").symlink_to(outside / "ledger.json")
    with pytest.raises(IntegrityError, match=f"privacy ledger store: .*{DS}.json is a symlink"):
        LedgerStore(tmp_path / "ledgers").validate(DS)  # refused before training, not after
    assert os.listdir(outside) == [] and not (tmp_path / "escape.txt").exists()
    atomic_write(run / "sub" / "deep" / "ok.txt", "fine", root=run)  # missing folders are created, no-follow
    assert (run / "sub" / "deep" / "ok.txt").read_text() == "fine"
    assert [p.name for p in run.rglob("*.tmp")] == []


def test_a_failed_stream_write_leaves_the_old_file(tmp_path):
    atomic_write(tmp_path / "m.csv", "old", root=tmp_path)
    with pytest.raises(RuntimeError):
        with safe_open_for_write(tmp_path / "m.csv", root=tmp_path, mode="w") as fh:
            fh.write("half")
            raise RuntimeError("killed mid-write")
    assert (tmp_path / "m.csv").read_text() == "old" and os.listdir(tmp_path) == ["m.csv"]


# -- locks -----------------------------------------------------------------------------------------------------
def _hold(path, ready, release):
    with exclusive_lock(path, what="run directory X"):
        ready.set()
        release.wait(30)


def _holder(path):
    ready, release = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=_hold, args=(path, ready, release))
    proc.start()
    assert ready.wait(30)
    return proc, release


def test_a_second_job_refuses_or_waits_and_a_killed_holder_frees_the_lock(tmp_path):
    lock = tmp_path / "run" / ".aisec-train.lock"
    proc, release = _holder(lock)
    with pytest.raises(LockError, match=rf"run directory X is locked by pid {proc.pid} on .*one job at a time"):
        with exclusive_lock(lock, wait=False, what="run directory X"):
            pass
    start = time.monotonic()
    with pytest.raises(LockError, match=r"after waiting 0.3s"):
        with exclusive_lock(lock, wait=0.3, what="run directory X"):
            pass
    assert time.monotonic() - start >= 0.3
    release.set()  # the holder finishes: a waiting job gets the lock
    with exclusive_lock(lock, wait=30.0):
        pass
    proc.join(30)
    proc, release = _holder(lock)
    os.kill(proc.pid, signal.SIGKILL)  # a holder killed outright leaves no stale lock
    proc.join(30)
    with exclusive_lock(lock, wait=5.0):
        with pytest.raises(LockError, match="already locked by this thread"):
            with exclusive_lock(lock):
                pass


def test_lock_file_symlink_is_refused(tmp_path):
    (tmp_path / "x.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(IntegrityError, match="is a symlink"):
        with exclusive_lock(tmp_path / "x.lock"):
            pass


# -- the ledger: forgery of each kind --------------------------------------------------------------------------
def _forge_edit(records):
    records[2]["history"][0][2] = 1  # fewer steps than were taken


def _forge_delete(records):
    del records[3]


def _forge_reorder(records):
    records[2], records[3] = records[3], records[2]


def _forge_unkeyed(records):
    records[2]["history"][0][2] = 1
    body = {k: v for k, v in records[2].items() if k != "tag"}
    records[2]["tag"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _forge_truncate(records):
    del records[-2:]


def _forge_append(records):
    records.append({**records[-1], "seq": len(records), "prev": records[-1]["tag"], "tag": "v1:0000:00"})


def _forge_malformed(records):
    records[1] = ["not", "a", "record"]


FORGERIES = {
    "edited record": (_forge_edit, "does not verify"),
    "deleted record": (_forge_delete, "out of place"),
    "reordered records": (_forge_reorder, "out of place"),
    "recomputed unkeyed hash": (_forge_unkeyed, "no valid keyed tag"),
    "truncated file": (_forge_truncate, "records were removed or the file was rolled back"),
    "appended forged record": (_forge_append, "neither the current key"),
    "malformed record": (_forge_malformed, "is not an object"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_every_forgery_of_the_ledger_is_refused_in_one_line(tmp_path, name):
    store = ledger_with_runs(tmp_path / "ledgers")
    forge, message = FORGERIES[name]
    edit_ledger(store, forge)
    with pytest.raises(IntegrityError, match=message) as err:
        _ = store.view(DS).records
    assert "\n" not in str(err.value) and DS in str(err.value)
    with pytest.raises(IntegrityError):
        with store.open(DS):
            pass


def test_a_deleted_or_rolled_back_ledger_does_not_reset_the_budget(tmp_path):
    store = ledger_with_runs(tmp_path / "ledgers")
    path = store.path / f"{DS}.json"
    old_copy = path.read_bytes()
    with store.open(DS) as led:
        led.charge("r2", [(1.1, 0.01, 500)])
    path.write_bytes(old_copy)  # a consistent, correctly tagged, older ledger
    with pytest.raises(IntegrityError, match="rolled back"):
        _ = store.view(DS).records
    path.unlink()
    with pytest.raises(IntegrityError, match="is missing but its anchor .* a deleted ledger does not reset"):
        with store.open(DS):
            pass
    path.write_bytes(old_copy)
    anchor = anchors_mod.anchor_path(path)
    forged = json.loads(anchor.read_text()) | {"seq": 0}  # the anchor is keyed too
    anchor.write_text(json.dumps(forged))
    with pytest.raises(IntegrityError, match="does not verify"):
        _ = store.view(DS).records


def test_a_ledger_changes_only_under_its_lock(tmp_path):
    store = ledger_with_runs(tmp_path / "ledgers")
    with pytest.raises(IntegrityError, match="changed only under its lock"):
        store.view(DS).charge("r1", [(1.1, 0.01, 1)])


# -- the ledger: composition, budget and invariants ------------------------------------------------------------
def test_composition_across_runs_equals_opacus_on_the_concatenated_history(tmp_path):
    from opacus.accountants import create_accountant

    store = ledger_with_runs(tmp_path / "ledgers")
    led = store.view(DS)
    assert led.steps("r1") == 150 and led.steps() == 170 and led.history() == [(1.1, 0.01, 170)]
    acc = create_accountant("rdp")
    acc.history = [(1.1, 0.01, 50)] * 3 + [(1.1, 0.01, 20)]
    assert led.total_epsilon() == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert led.total_epsilon() > led.total_epsilon(run_id="r1") > led.total_epsilon(run_id="r2") > 0
    mixed = [(1.1, 0.01, 100), (3.0, 0.02, 100)]
    assert compose_epsilon(mixed, delta=1e-5, accountant="gdp") == compose_epsilon(mixed, delta=1e-5, accountant="rdp")


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_composed_epsilon_is_opacus_own_number_for_a_mixed_history(accountant):
    """The store shares the ledger's cached accounting (privacy/accounting.py); the number must stay Opacus'."""
    from opacus.accountants import create_accountant

    history = [(1.1, 0.01, 500), (2.0, 0.02, 100), (1.1, 0.01, 300)]
    reference = create_accountant(accountant)
    reference.history = [(1.1, 0.01, 800), (2.0, 0.02, 100)]  # merged: composition is commutative
    assert compose_epsilon(history, delta=1e-5, accountant=accountant) == reference.get_epsilon(delta=1e-5)


def test_run_scoped_runs_are_recorded_and_composed_and_the_first_fixes_the_budget(tmp_path):
    from opacus.accountants import create_accountant

    with LedgerStore(tmp_path / "ledgers").open(DS) as led:
        for run_id in ("r1", "r2"):  # a sweep of run-scoped models: the first one's target is the data's budget
            led.begin_run(run_id, **RUN, target_epsilon=3.0, n_train=1000, budget_scope="run")
            led.charge(run_id, [(1.1, 0.01, 40)])
        assert led.budget()["target_epsilon"] == 3.0 and led.steps() == 80  # no run scope without a target
        acc = create_accountant("rdp")
        acc.history = [(1.1, 0.01, 80)]
        assert led.spent_epsilon("r2") == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_budget_is_enforced_across_runs_and_raised_only_on_record(tmp_path):
    store = LedgerStore(tmp_path / "ledgers")
    with store.open(DS) as led:
        begin(led, "r1", target_epsilon=1.0)
        allowed = led.require_steps(noise_multiplier=1.1, sample_rate=0.01, limit=100_000)
        led.charge("r1", [(1.1, 0.01, allowed)])
        assert led.total_epsilon() <= 1.0
    with store.open(DS) as led:  # a new run directory on the same data gets no fresh budget
        begin(led, "r2", target_epsilon=1.0)
        with pytest.raises(
            BudgetError, match=r"privacy budget exhausted for dataset .*: epsilon (0\.99\d|1\.000) spent by 1"
        ):
            led.require_steps(noise_multiplier=1.1, sample_rate=0.01, limit=1000)
        with pytest.raises(BudgetError, match=r"target_epsilon=2.0 exceeds the recorded budget 1.0 .* raise-target"):
            begin(led, "r3", target_epsilon=2.0)
        with pytest.raises(BudgetError, match="--why is required"):
            led.raise_target(2.0, why="  ")
        raised = led.raise_target(2.0, why="board approval 2026-11-30")
        assert raised["who"] and raised["host"] and raised["at"] and raised["previous"] == 1.0
        begin(led, "r3", target_epsilon=2.0)
        assert led.require_steps(noise_multiplier=1.1, sample_rate=0.01, limit=1000) > 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sample_rate", 0.02, "privacy.sample_rate=0.02 differs from 0.01"),
        ("noise_multiplier", 0.5, "privacy.noise_multiplier=0.5 differs from 1.1"),
        ("split_seed", 7, "train.seed=7 differs from 0"),
        ("delta", 1e-6, r"privacy.delta=1e-06 differs from the budget"),
        ("accountant", "prv", r"privacy.accountant='prv' differs from the budget"),
        ("budget_scope", "run", "privacy.budget_scope='run' differs from 'dataset'"),
    ],
)
def test_a_resume_that_changes_an_invariant_is_refused(tmp_path, key, value, message):
    with LedgerStore(tmp_path / "ledgers").open(DS) as led:
        begin(led, "r1")
        with pytest.raises(BudgetError, match=message):
            begin(led, "r1", **{key: value})


def test_delta_and_target_rules(tmp_path):
    with LedgerStore(tmp_path / "ledgers").open(DS) as led:
        with pytest.raises(ConfigError, match=r"privacy.delta=0.5 is not allowed: must be below 1/n = 0.001"):
            begin(led, "r1", delta=0.5)
        with pytest.raises(ConfigError, match=r"privacy.target_epsilon=inf is not allowed: must be a finite"):
            begin(led, "r1", target_epsilon=float("inf"))
        assert led.records == []  # a refusal records nothing
        led.begin_run("r1", **{**RUN, "delta": 0.01}, target_epsilon=3.0, n_train=1000, delta_reason="public data")
        override = [r for r in led.records if r["kind"] == "delta_override"]
        assert override[0]["why"] == "public data" and override[0]["n_train"] == 1000


# -- concurrency and delegation between processes --------------------------------------------------------------
def _spend(store_dir, run_id, result):
    store = LedgerStore(store_dir)
    with store.open(DS, wait=60.0) as led:
        begin(led, run_id, target_epsilon=1.0)
        try:
            allowed = led.require_steps(noise_multiplier=1.1, sample_rate=0.01, limit=400)
        except BudgetError:
            result.put((run_id, 0))
            return
        led.charge(run_id, [(1.1, 0.01, allowed)])
        result.put((run_id, allowed))


def test_four_concurrent_jobs_on_one_dataset_never_overspend(tmp_path):
    result = FORK.Queue()
    procs = [FORK.Process(target=_spend, args=(tmp_path / "ledgers", f"job{i}", result)) for i in range(4)]
    for p in procs:
        p.start()
    spent = dict(result.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    led = LedgerStore(tmp_path / "ledgers").view(DS)
    assert led.steps() == sum(spent.values()) and sorted(led.runs()) == sorted(spent)
    assert led.total_epsilon() <= 1.0 and led.steps_within(noise_multiplier=1.1, sample_rate=0.01, limit=50) == 0


def _charge_via(delegate, result):
    try:
        delegate.charge("r1", [(1.1, 0.01, 7)])
        result.put("charged")
    except IntegrityError as err:
        result.put(str(err))


def test_a_child_charges_under_its_parents_lock_and_nobody_else_can(tmp_path):
    store = ledger_with_runs(tmp_path / "ledgers")
    result = FORK.Queue()
    with store.open(DS) as led:
        child = FORK.Process(target=_charge_via, args=(led.delegate(), result))
        child.start()
        assert result.get(timeout=30) == "charged"
        child.join(30)
        assert led.steps("r1") == 157
    child = FORK.Process(target=_charge_via, args=(led.delegate(), result))  # the parent released the lock
    child.start()
    assert "changed only under its lock" in result.get(timeout=30)
    child.join(30)


# -- rotation --------------------------------------------------------------------------------------------------
def test_key_rotation_retags_the_ledger(tmp_path, keyed, monkeypatch):
    store = ledger_with_runs(tmp_path / "ledgers")
    before = store.view(DS).total_epsilon()
    new_key = tmp_path / "keys" / "new.key"
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(new_key))
    with pytest.raises(IntegrityError, match="neither the current key"):
        _ = store.view(DS).records  # the new key alone cannot read the old ledger
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(keyed))
    with store.open(DS) as led:
        assert led.retag() == 7
        assert {keys.tag_key_id(r["tag"]) for r in led.records} == {keys.current_key().id}
    monkeypatch.delenv("AISEC_TRAIN_OLD_KEY_FILES")  # the old key is dropped
    led = store.view(DS)
    assert led.total_epsilon() == before and led.records[-1]["kind"] == "retag"


# -- timing (the overhead figure's measurement) ----------------------------------------------------------------
def test_timing_is_off_by_default_and_counts_each_operation_once_when_asked(tmp_path):
    import subprocess
    import sys

    from aisec_train.store import timing

    assert not timing.ENABLED and timing.timed("x")(len) is len  # off: the functions themselves, nothing costs
    out = tmp_path / "timing.jsonl"
    code = (
        "from pathlib import Path; from aisec_train.store import atomic_write, lock_run_dir, tag;"
        "from aisec_train.privacy import LedgerStore;"
        f"root = Path({str(tmp_path)!r}); tag(b'x', 'ledger');"
        "atomic_write(root / 'r' / 'a.json', b'{}', root=root / 'r');"
        "ctx = lock_run_dir(root / 'r'); ctx.__enter__(); ctx.__exit__(None, None, None);"
        f"store = LedgerStore(root / 's'); ctx = store.open({DS!r}); led = ctx.__enter__();"
        "led.begin_run('r1', delta=1e-5, accountant='rdp', sample_rate=0.01, noise_multiplier=1.1, split_seed=0,"
        " target_epsilon=3.0, n_train=1000); ctx.__exit__(None, None, None)"
    )
    env = {**os.environ, "AISEC_TRAIN_STORE_TIMING": str(out)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    totals = json.loads(out.read_text().splitlines()[-1])["totals"]
    assert totals["write"]["calls"] >= 3 and totals["lock"]["calls"] >= 4 and totals["ledger.commit"]["calls"] == 2
    assert totals["tag"]["outermost_seconds"] < totals["tag"]["seconds"]  # most tags are made inside a commit
    assert all(t["outermost_seconds"] <= t["seconds"] + 1e-12 for t in totals.values())

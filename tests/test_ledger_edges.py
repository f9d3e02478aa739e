"""Edges of the privacy budget found by a red-team audit: a refused first run fixes no budget, GDP's root search
outside its bracket is a refusal (not a traceback), a copy of a dataset cannot pick a looser delta or another
accountant than its original, a deleted or renamed record set is tampering (runs and ``verify``), the ledger
tool's arguments (store, --wait, hashes) are checked before any work, and ``budget_scope=run`` on a copy is held to
its records' spend."""

from __future__ import annotations

import math
import shutil
from contextlib import ExitStack

import numpy as np
import pytest
from opacus.accountants import create_accountant

from aisec_train.data.records import digest_arrays
from aisec_train.privacy import LedgerStore, ledger_cli
from aisec_train.privacy.accounting import epsilon
from aisec_train.privacy.budget import search_steps
from aisec_train.privacy.ledger import PrivacyLedger
from aisec_train.privacy.record_sets import RecordSets, register_and_share
from aisec_train.privacy.spend import DatasetSpend
from aisec_train.store import BudgetError
from aisec_train.store.errors import IntegrityError, LockError
from tests.test_ledger_cli import cli

pytestmark = pytest.mark.usefixtures("keyed")  # a key and anchors of its own for each test (conftest.py)


@pytest.fixture(autouse=True)
def own_registry(tmp_path, monkeypatch):
    """Real runs register their model: under this test's own key, so in a registry of this test's own (the
    session's registry must stay readable under the session's key)."""
    monkeypatch.setenv("AISEC_TRAIN_REGISTRY", str(tmp_path / "registry.json"))


ORIGINAL, COPY = "a" * 64, "b" * 64
FAST = ["dataset=npz", "train.epochs=1", "audit=off", "robustness.evaluate=false"]


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.rint(bunch.images / 16 * 255).astype(np.uint8)[:, None], bunch.target.astype(np.int64)


def admit(
    store, dataset, run_id, *, digests=None, noise=1.0, steps=10, target=3.0, delta=1e-5, accountant="rdp", wait=0.0
):
    """One run's admission and charge, as the loop does them (sample rate 0.1); returns the spend's summary."""
    with store.open(dataset) as ledger, ExitStack() as hold:
        spend = DatasetSpend(ledger.delegate(), run_id, "dataset", 0, target, 1000)
        if digests is not None:
            spend.shared = register_and_share(ledger, digests, hold=hold, wait=wait)
        run = PrivacyLedger(accountant, delta)
        run.noise_multiplier, run.sample_rate = noise, 0.1
        stop = spend.begin(run, planned_steps=steps)
        run.accountant.history.append((noise, 0.1, min(steps, int(stop))))
        spend.charge(run)
        return spend.summary()


def kinds(store, dataset) -> list[str]:
    return [r["kind"] for r in store.view(dataset).records]


# -- 1. a refused first run fixes no budget ---------------------------------------------------------------------
def test_a_refused_first_run_leaves_the_ledger_as_it_was(tmp_path):
    store = LedgerStore(tmp_path / "store")
    with store.open(ORIGINAL) as led:
        led.refusal("runs/earlier", "an earlier refusal")  # a ledger with no budget yet
    before = (store.path / f"{ORIGINAL}.json").read_bytes()

    def refuse() -> None:
        raise BudgetError("not admitted")

    with store.open(ORIGINAL) as led, pytest.raises(BudgetError, match="not admitted"):
        led.begin_run(
            "runs/strict", delta=1e-8, accountant="rdp", sample_rate=0.1, noise_multiplier=0.6, split_seed=0,
            target_epsilon=0.2, n_train=1000, admit=refuse,
        )  # fmt: skip
    assert (store.path / f"{ORIGINAL}.json").read_bytes() == before
    # through the run's account: the refusal is recorded, no budget; the default job is then admitted
    with pytest.raises(BudgetError, match="not one step"):
        admit(store, ORIGINAL, "runs/strict", noise=0.6, target=0.2, delta=1e-8)
    assert kinds(store, ORIGINAL) == ["refusal", "refusal"] and store.view(ORIGINAL).budget() is None
    admit(store, ORIGINAL, "runs/default")
    assert store.view(ORIGINAL).budget() == {"target_epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}


def test_a_refused_first_federation_leaves_no_budget(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from aisec_train.privacy import federated_budget

    privacy = SimpleNamespace(target_epsilon=1.0, budget_scope=SimpleNamespace(value="dataset"), delta_reason=None)
    task = SimpleNamespace(cfg=SimpleNamespace(privacy=privacy), data=SimpleNamespace(split_seed=0))
    store = LedgerStore(tmp_path / "store")
    for noise, admitted in ((0.5, False), (4.0, True)):  # (noise, sample rate, steps, delta, accountant)
        monkeypatch.setattr(federated_budget, "planned", lambda task, plan, s=noise: (s, 0.1, 20, 1e-5, "rdp"))
        with store.open(ORIGINAL) as led:
            if admitted:
                federated_budget.begin(led, f"fed/{noise}", task, None, n_train=1000)
            else:
                with pytest.raises(BudgetError, match="does not fit"):
                    federated_budget.begin(led, f"fed/{noise}", task, None, n_train=1000)
        assert (store.view(ORIGINAL).budget() is not None) == admitted
    assert kinds(store, ORIGINAL) == ["budget", "run"]


def test_a_refused_first_cli_run_leaves_no_budget(tmp_path):
    from aisec_train.api import run

    x, y = digits()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = [*FAST, f"dataset.path={tmp_path / 'd.npz'}"]
    strict = ["privacy.target_epsilon=0.2", "privacy.noise_multiplier=0.6", "privacy.delta=1e-8"]
    with pytest.raises(BudgetError, match="not one step"):
        run([*data, *strict], run_dir=tmp_path / "strict")
    store = LedgerStore()
    (dataset,) = store.datasets()
    assert kinds(store, dataset) == ["refusal"] and store.view(dataset).budget() is None
    run(data, run_dir=tmp_path / "default")  # before the fix: "privacy.delta=1e-05 differs from the budget"
    assert store.view(dataset).budget()["delta"] == 1e-5


# -- 2. GDP outside Opacus' root bracket ------------------------------------------------------------------------
def test_gdp_outside_the_root_bracket_is_inf_or_zero_not_a_traceback():
    for history in ([(1.1, 0.01, 500)], [(0.8, 0.3, 3)]):  # where Opacus answers, its own number
        opacus = create_accountant("gdp")
        opacus.history = history
        assert epsilon("gdp", history, 1e-5) == opacus.get_epsilon(delta=1e-5)
    for history in ([(0.3, 0.25, 4)], [(0.02, 0.5, 10)]):  # little noise: no epsilon up to 500 holds
        with pytest.raises(ValueError, match="different signs"):
            opacus = create_accountant("gdp")
            opacus.history = history
            opacus.get_epsilon(delta=1e-5)
        assert epsilon("gdp", history, 1e-5) == math.inf
    assert epsilon("gdp", [(20.0, 1e-4, 1)], 1e-5) == 0.0  # mu ~ 0: already (0, delta)-DP
    found = search_steps([], noise_multiplier=0.3, sample_rate=0.25, target_epsilon=3.0, limit=8, delta=1e-5,
                         accountant="gdp")  # fmt: skip
    assert found == 0


def test_a_gdp_run_with_too_little_noise_is_refused_and_fixes_no_budget(tmp_path):
    store = LedgerStore(tmp_path / "store")
    with pytest.raises(BudgetError, match="not one step"):
        admit(store, ORIGINAL, "runs/gdp", noise=0.3, accountant="gdp")
    assert kinds(store, ORIGINAL) == ["refusal"] and store.view(ORIGINAL).budget() is None


# -- 3. a copy cannot pick looser terms than its original -------------------------------------------------------
def test_a_copy_cannot_loosen_delta_or_change_the_accountant(tmp_path):
    store = LedgerStore(tmp_path / "store")
    x, y = digits()
    records = digest_arrays(x[:100], y[:100])
    admit(store, ORIGINAL, "runs/original", digests=records, steps=5)
    for delta, accountant in ((6e-4, "rdp"), (1e-5, "prv")):
        with pytest.raises(BudgetError, match=f"differs from dataset {ORIGINAL[:16]} .delta 1e-05, accountant 'rdp'"):
            admit(store, COPY, f"runs/{delta}-{accountant}", digests=records, delta=delta, accountant=accountant)
        assert store.view(COPY).budget() is None
    summary = admit(
        store, COPY, "runs/same-terms", digests=records, noise=2.0, steps=5
    )  # the original's terms: admitted
    assert summary["records"]["shared_with"] == {ORIGINAL[:16]: 100}


# -- 4. a deleted or renamed record set is tampering ------------------------------------------------------------
@pytest.mark.parametrize("how", ["deleted", "renamed", "deleted with its ledger"])
def test_a_missing_record_set_is_refused_not_a_fresh_budget(tmp_path, how, capsys):
    store = LedgerStore(tmp_path / "store")
    x, y = digits()
    records = digest_arrays(x[:100], y[:100])
    admit(store, ORIGINAL, "runs/original", digests=records, steps=30)
    path = RecordSets(store.path).path(ORIGINAL)
    if how == "renamed":
        path.rename(path.with_name("elsewhere.digests"))
    else:
        path.unlink()
    if how == "deleted with its ledger":
        (store.path / f"{ORIGINAL}.json").unlink()
    with pytest.raises(IntegrityError, match="is missing but its anchor"):
        admit(store, COPY, "runs/copy", digests=records)
    with pytest.raises(SystemExit) as exit_:
        ledger_cli.main(["--store", str(store.path), "verify"])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and f"FORGED  {ORIGINAL}" in out.out and "record set" in out.out


def test_a_copy_through_the_api_is_refused_a_looser_delta_and_a_deleted_set(tmp_path):
    """The audit's reproduction with real runs: the original spends its budget; a byte-identical copy with a
    looser delta is refused; with the original's record set deleted it is refused as tampering."""
    from aisec_train.api import run

    x, y = digits()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    run([*FAST, f"dataset.path={tmp_path / 'd.npz'}"], run_dir=tmp_path / "original")
    shutil.copy(tmp_path / "d.npz", tmp_path / "copy.npz")
    copy = [*FAST, f"dataset.path={tmp_path / 'copy.npz'}"]
    with pytest.raises(BudgetError, match=r"differs from dataset \w+ \(delta 1e-05"):
        run([*copy, "privacy.delta=6e-4", "privacy.noise_multiplier=2.0"], run_dir=tmp_path / "loose")
    store = LedgerStore()
    original = store.datasets()[0] if kinds(store, store.datasets()[0])[0] == "budget" else store.datasets()[1]
    RecordSets(store.path).path(original).unlink()
    with pytest.raises(IntegrityError, match="is missing but its anchor"):
        run(copy, run_dir=tmp_path / "after_delete")
    assert not (tmp_path / "loose" / "model.pt").exists() and not (tmp_path / "after_delete" / "model.pt").exists()


# -- 5. the ledger tool's arguments -----------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path) -> LedgerStore:
    store = LedgerStore(tmp_path / "store")
    admit(store, ORIGINAL, "runs/a")
    return store


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["raise-target", "aaaa", "--epsilon", 5, "--why", "x", "--wait", "-5"], "--wait: '-5' is not allowed"),
        (["raise-target", "aaaa", "--epsilon", 5, "--why", "x", "--wait", "nan"], "--wait: 'nan' is not allowed"),
        (["raise-target", "aaaa", "--epsilon", 5, "--why", "x", "--wait", "inf"], "--wait: 'inf' is not allowed"),
        (["verify", "zzzz"], "dataset hash 'zzzz' is not allowed: 4 to 64 lowercase hexadecimal"),
        (["verify", "0000"], "dataset hash prefix 0000 is ambiguous or unknown"),
    ],
)
def test_bad_arguments_are_refused_in_one_line_and_change_nothing(store, capsys, args, message):
    before = (store.path / f"{ORIGINAL}.json").read_bytes()
    code, out, err = cli(capsys, "--store", store.path, *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert (store.path / f"{ORIGINAL}.json").read_bytes() == before


RAISE = ["raise-target", "a" * 64, "--epsilon", 5, "--why", "x"]


@pytest.mark.parametrize("command", [["list"], ["verify"], ["show", "aaaa"], RAISE])
def test_a_store_that_is_not_a_folder_is_refused(tmp_path, capsys, command):
    (tmp_path / "file").write_text("not a store")
    for store, what in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is not a directory")):
        code, out, err = cli(capsys, "--store", store, *command)
        assert code == 2 and out == "" and f"ledger store {store} (from --store) {what}" in err, err
    assert not (tmp_path / "nope").exists()  # raise-target created no store
    code, _, err = cli(capsys, "--store", "", *command)
    assert code == 2 and "--store: '' is not allowed" in err, err


# -- 6. budget_scope=run on a copy is held to its records' spend ------------------------------------------------
def test_budget_scope_run_on_a_copy_is_held_to_the_records_spend(tmp_path):
    """The audit's reproduction: after the original spent its records' budget (target 3), a permuted copy with no
    target of its own and a float64 copy with target 3 trained under budget_scope=run without a reason and reported
    the records at 0.0 or past 3 with the DP item passed. Now they are refused as on the original, and with a
    reason the pass is an ``exceed`` record and the report states the records' true spend."""
    from aisec_train.api import run

    x, y = digits()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    run([*FAST, f"dataset.path={tmp_path / 'd.npz'}"], run_dir=tmp_path / "original")
    order = np.random.default_rng(0).permutation(len(y))
    np.savez(tmp_path / "perm.npz", x=x[order], y=y[order])
    np.savez(tmp_path / "f64.npz", x=x / 255.0, y=y)
    untargeted = ["privacy.budget_scope=run", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"]
    perm = [*FAST, f"dataset.path={tmp_path / 'perm.npz'}", *untargeted]
    f64 = [*FAST, f"dataset.path={tmp_path / 'f64.npz'}", "privacy.budget_scope=run"]
    for overrides, name in ((perm, "perm"), (f64, "f64")):
        with pytest.raises(BudgetError, match=r"past the target 3\.0 of \d+ record\(s\) that dataset\(s\) \w+ also"):
            run(overrides, run_dir=tmp_path / name)
        assert not (tmp_path / name / "model.pt").exists()
    report = run([*perm, "privacy.budget_reason=copy audit ticket 7"], run_dir=tmp_path / "perm_on_record")
    records = report.get("privacy.budget.records")
    assert records["epsilon_max"] > 4.0 and records["target_epsilon"] == 3.0 and records["exceeded"]
    item = next(c for c in report.checklist if c["item"].startswith("differentially private"))
    assert f"epsilon {records['epsilon_max']:.3f} of the records' target 3.0" in item["evidence"]
    assert "passed on record" in item["evidence"]
    (exceed,) = report.get("privacy.budget.dataset_exceeds")
    assert exceed["why"] == "copy audit ticket 7" and exceed["target_epsilon"] == 3.0
    assert exceed["epsilon_after"] == pytest.approx(records["epsilon_max"], rel=1e-6)


# -- 7. copies of the records are serialised by their datasets' locks --------------------------------------------
def _hold_while(store, dataset, digests, started, release, *, steps):
    """A job on ``dataset`` in another thread: admitted on ``digests``, it says so, and charges ``steps`` only once
    ``release`` is set, then lets its lock go."""
    with store.open(dataset) as ledger, ExitStack() as hold:
        spend = DatasetSpend(ledger.delegate(), "runs/holder", "dataset", 0, 3.0, 1000)
        spend.shared = register_and_share(ledger, digests, hold=hold)
        run = PrivacyLedger("rdp", 1e-5)
        run.noise_multiplier, run.sample_rate = 2.0, 0.1
        spend.begin(run, planned_steps=steps)
        started.set()
        release.wait(30)
        run.accountant.history.append((2.0, 0.1, steps))
        spend.charge(run)


def test_a_copy_waits_for_a_running_job_on_its_records_and_meets_its_charge(tmp_path):
    """The race the audit described: a job on the original was admitted and still training (its charge not yet
    written) when a job on a copy of its records was admitted on the spend the ledger showed, and both spent the
    last of the budget. Now the copy's job takes the original's lock before it reads that spend: it waits for the
    running job, then meets its charge and is refused."""
    import threading

    store = LedgerStore(tmp_path / "store")
    x, y = digits()
    digests = digest_arrays(x, y)
    admit(store, ORIGINAL, "runs/first", digests=digests, noise=2.0, steps=10)  # the records are registered
    started, release = threading.Event(), threading.Event()
    # At noise 2, q 0.1: 10 steps are epsilon 0.94, 70 are 2.17, 100 are 2.58 and 160 are 3.28 (target 3). The
    # copy's 60 steps fit beside the first 10 but not beside the holder's 90 more.
    holder = threading.Thread(target=_hold_while, args=(store, ORIGINAL, digests, started, release), daemon=True,
                              kwargs={"steps": 90})  # fmt: skip
    holder.start()
    assert started.wait(30)
    threading.Timer(0.5, release.set).start()  # the holder charges half a second after the copy's job starts
    with pytest.raises(BudgetError, match=r"1797 record\(s\) that dataset\(s\) a{16} also hold are at epsilon 2\.5"):
        admit(store, COPY, "runs/copy", digests=digests, noise=2.0, steps=60, wait=30.0)
    holder.join(30)
    assert kinds(store, COPY)[-1] == "refusal"  # and no budget was fixed by the refused run


def test_a_copy_is_refused_in_one_line_while_its_records_train_elsewhere(tmp_path):
    """With ``train.lock_wait_s=0`` (the default) the copy's run is refused before any step, naming the dataset
    whose job holds its records and that job; the copy's ledger fixes no budget and the run writes no model."""
    import threading

    from aisec_train.api import run

    x, y = digits()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.savez(tmp_path / "copy.npz", x=x[::-1], y=y[::-1])
    run([*FAST, f"dataset.path={tmp_path / 'd.npz'}"], run_dir=tmp_path / "original")
    store = LedgerStore()
    (original,) = store.datasets()
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_until, args=(store, original, started, release), daemon=True)
    holder.start()
    assert started.wait(30)
    try:
        with pytest.raises(LockError, match=rf"privacy ledger of dataset {original[:16]} \(it holds \d+ of this run"):
            run([*FAST, f"dataset.path={tmp_path / 'copy.npz'}"], run_dir=tmp_path / "copy")
    finally:
        release.set()
        holder.join(30)
    assert all(store.view(d).budget() is None for d in store.datasets() if d != original)  # no budget fixed
    assert not (tmp_path / "copy" / "model.pt").exists()


def _hold_until(store, dataset, started, release):
    with store.open(dataset):
        started.set()
        release.wait(30)


@pytest.mark.slow
def test_two_jobs_started_at_once_on_copies_never_both_spend_the_last_budget(tmp_path):
    """Two real ``aisec-train`` processes on two copies of the digits, started together, each planned to spend the
    records' whole target: at most one is admitted, and the records' composed spend stays within the target."""
    import os
    import subprocess
    import sys

    x, y = digits()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", x=x[::-1], y=y[::-1])
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aisec_train",
                *FAST,
                f"dataset.path={tmp_path / name}.npz",
                "train.lock_wait_s=120",
                f"hydra.run.dir={tmp_path / name}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )  # fmt: skip
        for name in ("a", "b")
    ]
    results = [(job.wait(600), job.stderr.read()) for job in jobs]
    assert sorted(code for code, _ in results) in ([0, 2], [2, 2]), results
    for code, err in results:
        assert code == 0 or (err.count("\n") == 1 and "Traceback" not in err), err
    store = LedgerStore()
    spent = [store.view(d).total_epsilon() for d in store.datasets()]
    assert sum(spent) <= 3.0 + 1e-6, spent  # one dataset's runs hold every record: their spend adds up

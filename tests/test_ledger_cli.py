"""`aisec-train-ledger`: show, list, verify, raise-target (recorded), retag; every bad input is one line, exit 2."""

from __future__ import annotations

import hashlib
import json
import multiprocessing

import pytest
import torch

from aisec_train.privacy import LedgerStore, ledger_cli
from aisec_train.store import keys
from aisec_train.train import checkpoint

FORK = multiprocessing.get_context("fork")
DS = hashlib.sha256(b"digits manifest").hexdigest()
RUN = {"delta": 1e-5, "accountant": "rdp", "sample_rate": 0.01, "noise_multiplier": 1.1, "split_seed": 0}


pytestmark = pytest.mark.usefixtures("keyed")  # a key and anchors of its own for each test (conftest.py)


@pytest.fixture(autouse=True)
def ledgers(tmp_path, monkeypatch):
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(tmp_path / "ledgers"))


@pytest.fixture
def store(tmp_path) -> LedgerStore:
    store = LedgerStore()
    with store.open(DS) as led:
        for run_id, steps in (("runs/a", 300), ("runs/b", 100)):
            led.begin_run(run_id, **RUN, target_epsilon=3.0, n_train=1437)
            led.charge(run_id, [(1.1, 0.01, steps)])
    return store


def cli(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        ledger_cli.main([str(a) for a in args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def refused(result: tuple[int, str, str], message: str) -> None:
    code, _, err = result
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("aisec-train-ledger: error: ") and message in err, err


def test_show_lists_runs_spend_and_tag_status(store, capsys):
    code, out, _ = cli(capsys, "show", DS)
    assert code == 0 and out.startswith(f"dataset {DS}  ledger {store.path / (DS + '.json')}")
    assert "budget: target epsilon 3.0 at delta 1e-05 by the rdp accountant" in out
    assert "over 400 step(s)" in out and "run runs/a" in out and "steps 300" in out and "steps 100" in out
    assert "tags: 5 record(s) verified, chain and anchor intact" in out
    code, out, _ = cli(capsys, "show", DS, "--json")
    summary = json.loads(out)
    assert summary["steps"] == 400 and summary["epsilon_spent"] == pytest.approx(store.view(DS).total_epsilon())
    assert summary["epsilon_spent"] > max(r["epsilon_alone"] for r in summary["runs"])  # runs compose


def test_raise_target_is_a_recorded_act(store, capsys):
    code, out, _ = cli(capsys, "raise-target", DS, "--epsilon", 5, "--why", "approved by the DPO, ticket 42")
    assert code == 0 and "target 3.0 -> 5.0 (recorded)" in out
    raise_ = store.view(DS).records[-1]
    assert raise_["kind"] == "raise" and raise_["why"] == "approved by the DPO, ticket 42" and raise_["who"]
    assert "raise 3.0 -> 5.0" in cli(capsys, "show", DS)[1]
    refused(cli(capsys, "raise-target", DS, "--epsilon", 4, "--why", "x"), "is not above the current target 5.0")
    refused(cli(capsys, "raise-target", DS, "--epsilon", "inf", "--why", "x"), "--epsilon=inf is not allowed")
    refused(cli(capsys, "raise-target", DS, "--epsilon", 9), "the following arguments are required: --why")
    refused(cli(capsys, "raise-target", DS, "--epsilon", 9, "--why", " "), "--why is required")


def _hold(store_path, ready, release):
    with LedgerStore(store_path).open(DS):
        ready.set()
        release.wait(30)


def test_raise_target_refuses_while_a_job_holds_the_ledger(store, capsys):
    ready, release = FORK.Event(), FORK.Event()
    job = FORK.Process(target=_hold, args=(store.path, ready, release))
    job.start()
    assert ready.wait(30)
    try:
        refused(cli(capsys, "raise-target", DS, "--epsilon", 5, "--why", "x"), f"is locked by pid {job.pid}")
    finally:
        release.set()
        job.join(30)


def test_bad_input_is_one_line(store, capsys):
    refused(
        cli(capsys, "show", "not-a-hash"), "dataset hash 'not-a-hash' is not allowed: 4 to 64 lowercase hexadecimal"
    )
    refused(cli(capsys, "show", "0" * 64), f"no ledger for dataset {'0' * 64}")
    refused(cli(capsys, "frobnicate"), "invalid choice: 'frobnicate'")
    refused(cli(capsys), "the following arguments are required: command")


def test_list_and_verify_report_a_forged_ledger(store, capsys):
    code, out, _ = cli(capsys, "list")
    assert code == 0 and f"{DS}  runs 2  steps 400  epsilon" in out
    assert cli(capsys, "verify")[1] == f"ok  {DS}  5 record(s)\n"
    path = store.path / f"{DS}.json"
    body = json.loads(path.read_text())
    body["records"][2]["history"][0][2] = 1  # the first run's steps cut to 1
    path.write_text(json.dumps(body))
    code, out, err = cli(capsys, "verify")
    assert out.startswith(f"FORGED  {DS}  ledger ") and "record 2: keyed tag does not verify" in out
    refused((code, out, err), "1 ledger(s)")
    refused(cli(capsys, "list"), "failed verification")
    refused(cli(capsys, "show", DS), "record 2: keyed tag does not verify (edited or forged); refusing")


def test_retag_after_rotation(store, capsys, keyed, tmp_path, monkeypatch):
    checkpoint.save({"w": torch.ones(2)}, tmp_path / "run" / "last.pt")
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(tmp_path / "keys" / "new.key"))
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(keyed))
    code, out, _ = cli(capsys, "show", DS)
    assert code == 0 and "under old key(s)" in out  # still readable, and it says a retag is due
    code, out, _ = cli(capsys, "retag", "--artifact", tmp_path / "run" / "last.pt")
    assert code == 0 and f"{DS}: re-tagged 5 record(s)" in out and "last.pt: re-tagged" in out
    monkeypatch.delenv("AISEC_TRAIN_OLD_KEY_FILES")  # the old key is dropped
    assert cli(capsys, "verify")[0] == 0 and torch.equal(
        checkpoint.load(tmp_path / "run" / "last.pt")["w"], torch.ones(2)
    )
    assert {keys.tag_key_id(r["tag"]) for r in store.view(DS).records} == {keys.current_key().id}


@pytest.mark.parametrize(
    ("epsilon", "why", "message"),
    [
        ("1e308", "ok", "--epsilon=1e+308 is not allowed: a dataset's target is at most 100"),
        ("100.5", "ok", "--epsilon=100.5 is not allowed: a dataset's target is at most 100"),
        ("inf", "ok", "--epsilon=inf is not allowed"),
        ("nan", "ok", "--epsilon=nan is not allowed"),
        ("5", "approved\nrm -rf /", "--why='approved\\nrm -rf /' is not allowed: one line of printable text"),
        ("5", "tab\there", "is not allowed: one line of printable text"),
        ("5", "x" * 201, "at most 200 characters"),
    ],
)
def test_raise_target_takes_a_finite_value_under_the_maximum_and_a_one_line_reason(
    store, capsys, epsilon, why, message
):
    refused(cli(capsys, "raise-target", DS, "--epsilon", epsilon, "--why", why), message)
    assert [r["kind"] for r in store.view(DS).records].count("raise") == 0  # nothing recorded
    code, out, _ = cli(capsys, "raise-target", DS, "--epsilon", 100, "--why", "x" * 200)  # the limits themselves
    assert code == 0 and "target 3.0 -> 100.0 (recorded)" in out


def test_show_takes_a_unique_hash_prefix(store, capsys):
    code, out, _ = cli(capsys, "show", DS[:16])  # as refusals print it
    assert code == 0 and out.startswith(f"dataset {DS}  ledger ")
    assert cli(capsys, "verify", DS[:8])[1] == f"ok  {DS}  5 record(s)\n"
    twin = DS[:6] + ("0" if DS[6] != "0" else "1") + DS[7:]  # a second dataset sharing the first 6 characters
    with store.open(twin) as led:
        led.begin_run("runs/c", **RUN, target_epsilon=3.0, n_train=1437)
    refused(
        cli(capsys, "show", DS[:6]), f"dataset hash prefix {DS[:6]} is ambiguous or unknown in {store.path} (2 match"
    )
    refused(cli(capsys, "show", "abc"), "dataset hash 'abc' is not allowed: 4 to 64")
    assert cli(capsys, "show", DS[:7])[0] == 0  # one more character decides


def test_a_refused_run_is_listed_as_a_refusal_not_a_run(store, capsys):
    with store.open(DS) as led:
        led.refusal("runs/late", "privacy budget exhausted for dataset 0123: nothing was trained")
    code, out, _ = cli(capsys, "show", DS)
    assert code == 0 and "refused run runs/late at " in out and ": privacy budget exhausted" in out
    assert "run runs/late  started" not in out
    summary = json.loads(cli(capsys, "show", DS, "--json")[1])
    assert [r["run_id"] for r in summary["runs"]] == ["runs/a", "runs/b"]
    assert [r["run_id"] for r in summary["refusals"]] == ["runs/late"]
    assert f"{DS}  runs 2  steps 400  epsilon" in cli(capsys, "list")[1] and "refused 1" in cli(capsys, "list")[1]

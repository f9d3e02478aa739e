"""Model inventory: every entry and every file it touches verified under the project key; forgeries refused.

Run folders are made here with the real checkpoint writer (model.pt + keyed tag + report.json), so these tests do
not need a training run; the last test checks that a real run registers itself.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from aisec_train.audit import registry, registry_cli
from aisec_train.audit.registry import Registry, RegistryError, resolve_registry_path
from aisec_train.hashing import sha256_file
from aisec_train.train import checkpoint
from tests.conftest import REPO, read_report

SCRIPT = Path(sys.executable).with_name("aisec-train-registry")


pytestmark = pytest.mark.usefixtures("keyed")  # a key and anchors of its own for each test (conftest.py)


def make_run(run: Path, value: float = 1.0, **sections: dict) -> Path:
    """A run folder as the pipeline leaves it: model.pt whose keyed tag records the run's claims, report.json."""
    run.mkdir(parents=True)
    report = {"data": {"manifest_sha256": "d" * 64}, "metrics": {"clean_accuracy": 0.9}, "governance": {"owner": "me"},
              "privacy": {"mode": "none", "epsilon": None, "delta": None}}  # fmt: skip
    for name, values in sections.items():
        report[name] = {**report.get(name, {}), **values}
    meta = {"model": {"private": report["privacy"]["mode"] == "dpsgd"}, "run": registry.run_claims(report, run)}
    digest = checkpoint.save({"w": torch.full((64,), value), "b": torch.zeros(3)}, run / "model.pt", root=run,
                             meta=meta)  # fmt: skip
    report["model"] = {"sha256": digest}
    (run / "report.json").write_text(json.dumps(report))
    return run


def cli(capsys, reg: Path, *args: object) -> tuple[int, str, str]:
    """The console script's entry point, in-process (one test below runs the installed script)."""
    with pytest.raises(SystemExit) as exit_:
        registry_cli.main(["--registry", str(reg), *map(str, args)])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def refused(code: int, err: str, message: str) -> None:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("aisec-train-registry: error: ") and message in err, err


def swap_model(run: Path) -> None:
    """An attacker's model.pt with a recomputed unkeyed sidecar."""
    torch.save({"w": torch.full((64,), -1.0), "b": torch.zeros(3)}, run / "model.pt")
    (run / "model.pt.sha256").write_text(f"{sha256_file(run / 'model.pt')}  model.pt\n")


def test_register_list_mark_good_and_roll_back(tmp_path, capsys):
    run_a, run_b = make_run(tmp_path / "a" / "run"), make_run(tmp_path / "b" / "run", 2.0)
    reg = tmp_path / "inventory" / "registry.json"
    for run in (run_a, run_b):
        code, out, err = cli(capsys, reg, "register", run)
        assert code == 0 and out.startswith("registered "), err
    ids = [e["id"] for e in Registry(reg).entries()]
    assert len(ids) == 2 and ids[0].startswith("a_run-") and ids[1].startswith("b_run-")

    code, out, _ = cli(capsys, reg, "list")
    assert code == 0 and out.splitlines()[0] == f"2 run(s) in {reg}" and "known-good" not in out
    assert all(i in out for i in ids) and out.count("run ok") == 2

    code, out, _ = cli(capsys, reg, "mark-good", ids[0])
    assert code == 0 and f"known-good {ids[0]}" in out
    assert "known-good  run ok        vault ok" in cli(capsys, reg, "list")[1].splitlines()[1]

    swap_model(run_a)  # the run folder is attacked after it was marked known-good
    dest = tmp_path / "serving" / "model.pt"
    code, out, err = cli(capsys, reg, "rollback", "--dest", dest)
    assert code == 0 and f"rolled back {dest} to {ids[0]}" in out, err
    assert torch.equal(checkpoint.load(dest)["w"], torch.ones(64))  # restored with a fresh keyed tag
    code, out, err = cli(capsys, reg, "list")  # list checks the run copy as well as the vault copy
    assert "run TAMPERED  vault ok" in out
    refused(code, err, "1 entr(ies) or file(s)")


def test_a_swapped_model_with_recomputed_sidecar_is_refused_and_nothing_is_written(tmp_path, capsys):
    run = make_run(tmp_path / "x" / "run")
    reg = tmp_path / "registry.json"
    assert cli(capsys, reg, "register", run)[0] == 0
    run_id = Registry(reg).entries()[0]["id"]
    before = reg.read_bytes()
    swap_model(run)
    refused(*cli(capsys, reg, "mark-good", run_id)[::2], "refusing a tampered file")
    refused(*cli(capsys, reg, "register", run)[::2], "refusing a tampered file")
    assert reg.read_bytes() == before and not (tmp_path / "known_good").exists()


EDITED_REPORT = {
    "clean accuracy raised": lambda r: r["metrics"].update(clean_accuracy=0.999),
    "membership AUC lowered": lambda r: r.setdefault("audit", {}).update(membership={"auc": 0.5}),
    "owner changed": lambda r: r["governance"].update(owner="mallory"),
    "risk level added": lambda r: r["governance"].update(risk_level="low"),
}


@pytest.mark.parametrize("name", EDITED_REPORT)
def test_an_edited_report_cannot_change_what_the_registry_signs(tmp_path, capsys, name):
    """report.json has no tag of its own: the headline metrics and governance an entry signs come from model.pt's
    keyed tag (the save stage runs after evaluation and audit), and a report that disagrees is refused."""
    run = make_run(tmp_path / "x" / "run", metrics={"clean_accuracy": 0.875}, governance={"owner": "me"})
    reg = tmp_path / "registry.json"
    report = json.loads((run / "report.json").read_text())
    EDITED_REPORT[name](report)
    (run / "report.json").write_text(json.dumps(report))
    refused(*cli(capsys, reg, "register", run)[::2], "does not belong to this run: report.json says ")
    assert not reg.exists()
    make_run(tmp_path / "y" / "run", metrics={"clean_accuracy": 0.875}, governance={"owner": "me"})
    assert cli(capsys, reg, "register", tmp_path / "y" / "run")[0] == 0
    entry = Registry(reg).entries()[0]
    assert entry["metrics"]["metrics.clean_accuracy"] == 0.875 and entry["governance"] == {"owner": "me"}


def edit_entry(reg: Path, change) -> None:
    body = json.loads(reg.read_text())
    change(body["runs"][0])
    reg.write_text(json.dumps(body))


FORGED = {
    "hash pointed at an attacker's model": lambda e: e.update(sha256="f" * 64),
    "known-good flag set": lambda e: e.update(known_good=True),
    "checkpoint path redirected": lambda e: e.update(checkpoint="/tmp/evil.pt"),
    "tag removed": lambda e: e.pop("tag"),
    "missing key": lambda e: e.pop("sha256"),
    "wrong type": lambda e: e.update(metrics=["not", "a", "dict"]),
}


@pytest.mark.parametrize("name", FORGED)
def test_forged_or_malformed_entries_are_refused_in_one_line(tmp_path, capsys, name):
    reg = tmp_path / "registry.json"
    Registry(reg).register(make_run(tmp_path / "x" / "run"))
    run_id = Registry(reg).entries()[0]["id"]
    edit_entry(reg, FORGED[name])
    before = reg.read_bytes()
    for args in (("mark-good", run_id), ("rollback", "--dest", tmp_path / "out.pt"), ("register", tmp_path / "x/run")):
        refused(*cli(capsys, reg, *args)[::2], "registry")
    code, out, err = cli(capsys, reg, "list")
    assert "FORGED" in out
    refused(code, err, "failed verification")
    assert reg.read_bytes() == before and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("content", ["{not json", '{"runs": 3}', '{"runs": [1, 2]}', "[]"])
def test_malformed_registry_files_exit_2_without_traceback(tmp_path, capsys, content):
    reg = tmp_path / "registry.json"
    reg.write_text(content)
    for args in (("list",), ("mark-good", "x"), ("rollback", "--dest", tmp_path / "m.pt")):
        code, _, err = cli(capsys, reg, *args)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_rollback_refuses_a_tampered_known_good_copy(tmp_path, capsys):
    reg = Registry(tmp_path / "registry.json")
    entry = reg.mark_good(reg.register(make_run(tmp_path / "y" / "run"))["id"])
    vault = Path(entry["vault_copy"])
    assert vault == tmp_path / "known_good" / f"{entry['sha256']}.pt"
    vault.write_bytes(vault.read_bytes()[:-10] + b"0123456789")
    dest = tmp_path / "serving" / "model.pt"
    dest.parent.mkdir()
    dest.write_bytes(b"the model in service")
    refused(*cli(capsys, reg.path, "rollback", "--to", entry["id"], "--dest", dest)[::2], "refusing a tampered")
    assert dest.read_bytes() == b"the model in service"  # nothing was restored over it
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.pt"]  # and no temporary file was left


def test_a_model_with_non_finite_weights_is_never_registered(tmp_path, capsys):
    run = tmp_path / "nan" / "run"
    run.mkdir(parents=True)
    checkpoint.save({"w": torch.tensor([1.0, float("nan")])}, run / "model.pt", root=run)
    reg = tmp_path / "registry.json"
    refused(*cli(capsys, reg, "register", run)[::2], "has non-finite weights (per its keyed tag)")
    assert not reg.exists()


def test_refusals_name_what_is_wrong(tmp_path):
    reg = Registry(tmp_path / "registry.json")
    with pytest.raises(RegistryError, match="no run is marked known-good"):
        reg.rollback(tmp_path / "m.pt")
    with pytest.raises(RegistryError, match=r"no run 'nope' in .*registry.json; `aisec-train-registry list`"):
        reg.mark_good("nope")
    with pytest.raises(RegistryError, match="model.pt does not exist"):
        reg.register(tmp_path)
    (tmp_path / "elsewhere.json").write_text('{"runs": []}')
    (tmp_path / "linked.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(RegistryError, match="linked.json is a symlink"):
        Registry(tmp_path / "linked.json").validate()


def test_concurrent_registrations_keep_every_entry(tmp_path):
    runs = [make_run(tmp_path / f"r{i}" / "run", float(i)) for i in range(6)]
    reg_path = tmp_path / "registry.json"
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda r: Registry(reg_path).register(r), runs))
    entries = Registry(reg_path).entries()
    assert sorted(e["run_dir"] for e in entries) == sorted(str(r.resolve()) for r in runs)
    assert not list(tmp_path.glob(".registry.*.tmp"))


def test_rotation_resigns_the_registry(tmp_path, keyed, monkeypatch, capsys):
    reg = Registry(tmp_path / "registry.json")
    reg.mark_good(reg.register(make_run(tmp_path / "z" / "run"))["id"])
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(tmp_path / "keys" / "new.key"))
    refused(*cli(capsys, reg.path, "list")[::2], "failed verification")
    monkeypatch.setenv("AISEC_TRAIN_OLD_KEY_FILES", str(keyed))
    code, out, _ = cli(capsys, reg.path, "retag")
    assert code == 0 and "re-signed 1 entr(ies)" in out
    monkeypatch.delenv("AISEC_TRAIN_OLD_KEY_FILES")
    code, out, _ = cli(capsys, reg.path, "list")
    assert code == 0 and "run ok        vault ok" in out  # entry and model.pt manifest both re-tagged


def test_registry_location(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(registry.REGISTRY_ENV, raising=False)
    assert resolve_registry_path() == tmp_path / "outputs" / "registry.json"  # one per project, not per day
    monkeypatch.setenv(registry.REGISTRY_ENV, str(tmp_path / "shared" / "inventory.json"))
    assert resolve_registry_path() == tmp_path / "shared" / "inventory.json"
    assert resolve_registry_path("explicit.json") == tmp_path / "explicit.json"  # the config wins


@pytest.mark.slow  # ~20 s only because `import aisec_train` imports torch; the command itself needs no torch
def test_installed_script_refuses_a_forged_entry_in_one_line(tmp_path):
    reg = tmp_path / "registry.json"
    Registry(reg).register(make_run(tmp_path / "s" / "run"))
    edit_entry(reg, FORGED["hash pointed at an attacker's model"])
    proc = subprocess.run([SCRIPT, "--registry", reg, "list"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "FORGED" in proc.stdout, proc.stderr


def test_run_registers_itself_with_governance(smoke_run, monkeypatch, private_keys):
    monkeypatch.setenv("AISEC_TRAIN_KEY_FILE", str(private_keys / "hmac.key"))  # the run used the session's key
    monkeypatch.setenv("AISEC_TRAIN_ANCHOR_DIR", str(private_keys / "anchors"))
    report = read_report(smoke_run)
    entry = Registry(Path(report["registry"]["path"])).get(report["registry"]["id"])
    assert (
        entry["sha256"]
        == report["model"]["sha256"]
        == hashlib.sha256((smoke_run / "model.pt").read_bytes()).hexdigest()
    )
    assert entry["governance"]["owner"] == report["governance"]["owner"]
    assert set(entry["governance"]) >= {"purpose", "data_sources", "owner", "risk_level"}
    assert entry["metrics"]["audit.membership.auc"] == report["audit"]["membership"]["auc"]

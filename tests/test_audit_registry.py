"""Model inventory: list, mark known-good, roll back after hash verification, refuse tampering (via the CLI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aisec_train.audit import registry
from aisec_train.audit.registry import Registry, RegistryError, resolve_registry_path
from aisec_train.data.dataset import sha256_file
from aisec_train.train import checkpoint
from tests.conftest import REPO, read_report

SCRIPT = Path(sys.executable).with_name("aisec-train-registry")


def cli(reg: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SCRIPT, "--registry", reg, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def copy_run(smoke_run: Path, dest: Path) -> Path:
    shutil.copytree(smoke_run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_register_list_mark_good_and_roll_back(smoke_run, tmp_path):
    run_a, run_b = copy_run(smoke_run, tmp_path / "a" / "run"), copy_run(smoke_run, tmp_path / "b" / "run")
    reg = tmp_path / "inventory" / "registry.json"
    for run in (run_a, run_b):
        proc = cli(reg, "register", run)
        assert proc.returncode == 0 and proc.stdout.startswith("registered "), proc.stderr
    ids = [e["id"] for e in Registry(reg).entries()]
    assert len(ids) == 2 and ids[0].startswith("a_run-") and ids[1].startswith("b_run-")

    listing = cli(reg, "list")
    assert listing.returncode == 0 and listing.stdout.splitlines()[0] == f"2 run(s) in {reg}"
    assert all(i in listing.stdout for i in ids) and "known-good" not in listing.stdout

    proc = cli(reg, "mark-good", ids[0])
    assert proc.returncode == 0 and f"known-good {ids[0]}" in proc.stdout
    assert "known-good" in cli(reg, "list").stdout.splitlines()[1]

    tamper(run_a / "model.pt")  # the run folder is attacked after it was marked known-good
    dest = tmp_path / "serving" / "model.pt"
    proc = cli(reg, "rollback", "--dest", dest)
    assert proc.returncode == 0 and f"rolled back {dest} to {ids[0]}" in proc.stdout, proc.stderr
    digest = read_report(smoke_run)["model"]["sha256"]
    assert sha256_file(dest) == digest and (dest.parent / "model.pt.sha256").read_text().split()[0] == digest
    assert "TAMPERED" not in cli(reg, "list").stdout  # the vault copy is what a known-good run relies on


def test_tampered_checkpoints_are_refused_and_nothing_is_written(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "x" / "run")
    reg = tmp_path / "registry.json"
    assert cli(reg, "register", run).returncode == 0
    run_id = Registry(reg).entries()[0]["id"]
    before = reg.read_bytes()

    tamper(run / "model.pt")
    proc = cli(reg, "mark-good", run_id)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("aisec-train-registry: error: checkpoint ") and "refusing a tampered" in proc.stderr
    assert reg.read_bytes() == before  # the refused edit left the registry untouched
    assert "TAMPERED" in cli(reg, "list").stdout

    proc = cli(reg, "register", run)
    assert proc.returncode == 2 and "refusing a tampered checkpoint" in proc.stderr
    assert reg.read_bytes() == before


def test_rollback_refuses_a_tampered_known_good_copy(smoke_run, tmp_path):
    run = copy_run(smoke_run, tmp_path / "y" / "run")
    reg = Registry(tmp_path / "registry.json")
    entry = reg.mark_good(reg.register(run)["id"])
    tamper(Path(entry["vault_copy"]))
    dest = tmp_path / "serving" / "model.pt"
    dest.parent.mkdir()
    dest.write_bytes(b"the model in service")
    proc = cli(reg.path, "rollback", "--to", entry["id"], "--dest", dest)
    assert proc.returncode == 2 and "refusing a tampered checkpoint" in proc.stderr
    assert dest.read_bytes() == b"the model in service"  # nothing was restored over it
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.pt"]  # and no temporary file was left


def test_refusals_name_what_is_wrong(smoke_run, tmp_path, capsys):
    reg = Registry(tmp_path / "registry.json")
    with pytest.raises(RegistryError, match="no run is marked known-good"):
        reg.rollback(tmp_path / "m.pt")
    with pytest.raises(RegistryError, match=r"no run 'nope' in .*registry.json; `aisec-train-registry list`"):
        reg.mark_good("nope")
    with pytest.raises(RegistryError, match="has no readable model.pt.sha256"):
        reg.register(tmp_path)
    reg.path.write_text("{not json")
    with pytest.raises(SystemExit) as exit_:
        registry.main(["--registry", str(reg.path), "list"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "is not readable JSON with a 'runs' list" in err


def test_registry_reads_the_checkpoint_hash_format(smoke_run):
    model = smoke_run / "model.pt"
    assert registry.recorded_hash(model) == checkpoint.recorded_hash(model) == sha256_file(model)


def test_concurrent_registrations_keep_every_entry(smoke_run, tmp_path):
    runs = [copy_run(smoke_run, tmp_path / f"r{i}" / "run") for i in range(6)]
    reg_path = tmp_path / "registry.json"
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda r: Registry(reg_path).register(r), runs))
    entries = json.loads(reg_path.read_text())["runs"]
    assert sorted(e["run_dir"] for e in entries) == sorted(str(r.resolve()) for r in runs)
    assert not list(tmp_path.glob(".registry.*.tmp"))


def test_registry_location(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(registry.REGISTRY_ENV, raising=False)
    assert resolve_registry_path() == tmp_path / "outputs" / "registry.json"  # one per project, not per day
    monkeypatch.setenv(registry.REGISTRY_ENV, str(tmp_path / "shared" / "inventory.json"))
    assert resolve_registry_path() == tmp_path / "shared" / "inventory.json"
    assert resolve_registry_path("explicit.json") == tmp_path / "explicit.json"  # the config wins


def test_run_registers_itself_with_governance(smoke_run):
    report = read_report(smoke_run)
    entry = Registry(Path(report["registry"]["path"])).get(report["registry"]["id"])
    assert entry["sha256"] == report["model"]["sha256"] == sha256_file(smoke_run / "model.pt")
    assert entry["governance"]["owner"] == report["governance"]["owner"]
    assert set(entry["governance"]) >= {"purpose", "data_sources", "owner", "risk_level"}
    assert entry["metrics"]["audit.membership.auc"] == report["audit"]["membership"]["auc"]

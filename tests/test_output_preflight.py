"""Every output is proved writable before the first step is charged, and a write that fails later ends in one line.

The tests run as root here, and root ignores permission bits, so a folder is made unwritable for real: as root
with ``chattr +i`` (an immutable folder: even root gets EPERM creating a file in it), otherwise with ``chmod 0500``
(which binds an ordinary user). The full disk is a 64 KiB tmpfs mounted in a user and mount namespace
(``unshare -rm``), so the kernel itself answers ENOSPC. Hydra's run directory is parsed with Hydra's own override
parser, so a quoted ``hydra.run.dir='...'`` is checked like a plain one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisec_train.errors import ConfigError
from aisec_train.preflight import probe_dir
from tests.conftest import REPO
from tests.fuzzing import BASE, call_cli


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[str]:
    """``folder`` made unwritable by a mechanism that binds the current user (root included); yields its name."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("root, and chattr +i is not supported on this file system")
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o500)
        try:
            yield "chmod 0500"
        finally:
            folder.chmod(0o700)


def refused(run_dir: Path, args: list[str], *needles: str) -> str:
    code, err, crash = call_cli([*BASE, *args])
    assert not crash and code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err, crash)
    assert all(n in err for n in needles), err
    return err


def no_charge(store: Path) -> bool:
    """The ledger store holds no dataset ledger: nothing was charged."""
    return not store.exists() or not any(p.suffix == ".jsonl" or "ledger" in p.name for p in store.rglob("*"))


def test_probe_is_a_real_write(tmp_path):
    probe_dir(tmp_path / "new" / "folder", "x")  # created, probed, left empty
    assert list((tmp_path / "new" / "folder").iterdir()) == []
    with unwritable(tmp_path / "ro"), pytest.raises(ConfigError, match="x: .* is not writable"):
        probe_dir(tmp_path / "ro", "x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="symlink"):
        probe_dir(tmp_path / "link", "x")


@pytest.mark.parametrize("which", ["registry", "ledger_store", "checkpoints"])
def test_an_unwritable_output_is_refused_before_any_step(tmp_path, monkeypatch, which):
    run_dir, store, reg = tmp_path / "run", tmp_path / "ledgers", tmp_path / "inventory" / "registry.json"
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(store))
    monkeypatch.setenv("AISEC_TRAIN_REGISTRY", str(reg))
    folder = {"registry": reg.parent, "ledger_store": store, "checkpoints": run_dir / "checkpoints"}[which]
    with unwritable(folder):
        err = refused(run_dir, [f"hydra.run.dir={run_dir}"], "is not writable", "nothing was trained or charged")
    assert no_charge(store) and not (run_dir / "report.json").exists(), err


def test_a_run_dir_under_a_read_only_parent_is_refused_before_hydra(tmp_path):
    with unwritable(tmp_path / "ro"):
        refused(tmp_path / "ro" / "run", [f"hydra.run.dir={tmp_path / 'ro' / 'run'}"], "hydra.run.dir", "not writable")


@pytest.mark.parametrize("form", ["hydra.run.dir={}", "hydra.run.dir='{}'", 'hydra.run.dir="{}"', "++hydra.run.dir={}"])
def test_quoting_cannot_skip_the_symlink_check(tmp_path, form):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "run").symlink_to(target)
    refused(tmp_path / "run", [form.format(tmp_path / "run")], "is a symlink")
    assert list(target.iterdir()) == []  # Hydra wrote nothing through the link
    planted = tmp_path / "run2"
    planted.mkdir()
    (planted / ".hydra").symlink_to(target)
    refused(planted, [form.format(planted)], ".hydra is a symlink")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("multirun", [False, True])
def test_a_symlinked_default_output_folder_is_refused_before_hydra_writes(tmp_path, monkeypatch, multirun):
    """No hydra.run.dir given: Hydra would write into outputs/DATE/TIME (multirun/... with -m) under the launch
    folder; a planted ``outputs`` link is refused as when it is named, and nothing lands in its target."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / ("multirun" if multirun else "outputs")).symlink_to(target)
    monkeypatch.chdir(launch)
    flags = ["-m"] if multirun else []  # Hydra reads flags, then one run of overrides
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    code, err, crash = call_cli([*flags, *BASE, *(["train.lr=0.1,0.2"] if multirun else [])])
    assert not crash and code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err, crash)
    assert key in err and "is a symlink" in err, err
    assert list(target.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a private tmpfs")
def test_a_full_disk_mid_run_ends_in_one_line_with_nothing_half_written(tmp_path):
    """The run directory is a 64 KiB tmpfs: Hydra's files and the probes fit, the first checkpoint does not."""
    run_dir, store = tmp_path / "run", tmp_path / "ledgers"
    run_dir.mkdir()
    cli = f"{sys.executable} -m aisec_train {' '.join(BASE)} train.epochs=2 hydra.run.dir={run_dir}"
    script = f"mount -t tmpfs -o size=64k tmpfs {run_dir} && {cli}; code=$?; ls -a {run_dir}/checkpoints; exit $code"
    env = {**os.environ, "AISEC_TRAIN_LEDGER_STORE": str(store), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    if "mount" in proc.stderr and proc.returncode == 32:
        pytest.skip("tmpfs mounts are not allowed in a user namespace here")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aisec-train")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-2000:]
    assert ".tmp" not in proc.stdout  # no temp file left half-written in checkpoints/
    listed = subprocess.run([sys.executable, "-m", "aisec_train.privacy.ledger_cli", "list"],
                            capture_output=True, text=True, cwd=REPO, env=env)  # fmt: skip
    # The smoke job runs 3 steps an epoch: epoch 1 ran and was charged before its checkpoint failed; nothing more.
    assert listed.returncode == 0 and "runs 1  steps 3  " in listed.stdout, (listed.stdout, listed.stderr)


def test_a_registry_the_run_could_not_join_is_refused_before_any_step(tmp_path, monkeypatch):
    """A registry whose entries do not verify (here: tagged under another key) used to refuse the run at its very
    end, after the whole budget was spent; it is now refused before the data is read."""
    run_dir, store, reg = tmp_path / "run", tmp_path / "ledgers", tmp_path / "inventory" / "registry.json"
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(store))
    monkeypatch.setenv("AISEC_TRAIN_REGISTRY", str(reg))
    reg.parent.mkdir(parents=True)
    entry = {"id": "other-run", "sha256": "0" * 64, "tag": "f" * 64}
    reg.write_text(json.dumps({"runs": [entry]}))
    refused(run_dir, [f"hydra.run.dir={run_dir}"], "audit.registry_path", "nothing was trained or charged")
    assert no_charge(store) and not (run_dir / "report.json").exists()

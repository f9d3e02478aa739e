"""A cluster's shared storage that cannot take a lock (NFSv3 without lockd, SMB, some FUSE mounts: flock answers
ENOLCK, EOPNOTSUPP or ENOSYS) is refused in one line naming the path and the fix, never treated as "held by
someone" or run unlocked. No such filesystem can be mounted on the test machine (no NFS, no libfuse), so flock's
own errno is injected at ``fcntl.flock``, the one call that meets the filesystem."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading

import pytest

from aisec_train.store.errors import LockError
from aisec_train.store.locks import NO_LOCKS, exclusive_lock
from tests.conftest import REPO


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_filesystem_without_locks_is_refused_in_one_line(tmp_path, monkeypatch, code):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = tmp_path / "ledgers" / "abc.lock"
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LockError) as refused, exclusive_lock(path, what="dataset ledger abc"):
        pytest.fail("the block ran without a lock")
    line = str(refused.value)
    assert "\n" not in line and line.startswith("dataset ledger abc: the filesystem holding ")
    assert str(path) in line and f"flock: {NO_LOCKS[code]}," in line and "privacy.ledger_store=DIR" in line
    assert len(os.listdir("/proc/self/fd")) == fds  # the lock file's descriptor was closed


def test_another_flock_failure_is_not_disguised(tmp_path, monkeypatch):
    import fcntl

    def broken(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"), exclusive_lock(tmp_path / "x.lock"):
        pass


NO_LOCKS_CLI = """
import errno, fcntl, sys
def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = no_locks
sys.argv = ["aisec-train", *sys.argv[1:]]
from aisec_train.cli import main
main()
"""


def test_the_cli_refuses_with_exit_2_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-c", NO_LOCKS_CLI, "experiment=smoke", "audit=off", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot take a lock (flock: ENOLCK" in last and str(run_dir) in last and "docs/cluster.md" in last
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "report.json").exists()


def test_a_refusal_names_a_holder_that_has_only_just_taken_the_lock(tmp_path):
    # The holder takes the flock first and writes its record a moment later; a job refused in between must still
    # name it (a CI run once saw "locked by another process" in the two-jobs drill).
    path = tmp_path / "run" / ".aisec-train.lock"
    path.parent.mkdir()
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    record = {"pid": 4242, "host": "node7", "user": "alice", "since": "2026-12-05T12:00:00+00:00"}
    late = threading.Timer(0.2, lambda: os.write(fd, json.dumps(record).encode()))
    late.start()
    try:
        with pytest.raises(LockError) as refused, exclusive_lock(path, what="run directory run"):
            pytest.fail("the block ran while another holder had the lock")
    finally:
        late.join()
        os.close(fd)
    assert "run directory run is locked by pid 4242 on node7 (user alice, since 2026-12-05" in str(refused.value)

"""Deployment engine: a real flower-superlink and two flower-supernode processes on 127.0.0.1.

The federation runs as documented for separate sites (docs/federated.md): TLS from a CA, SuperNode
authentication with registered keys (an unregistered SuperNode is turned away), and the job
(``federated.engine=deployment``) submits the apps with ``flwr run`` and completes two CKKS rounds.
Every process this test starts, and every process those start (SuperExec, ServerApp, ClientApps), carries
a per-test marker in its environment: cleanup finds them by it, even after they were re-parented.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from aisec_train.federated.config import DeploymentConfig
from aisec_train.federated.credentials import write_node_key, write_tls
from aisec_train.federated.deploy import CONNECTION, flwr_executable, supernode_command, write_flower_home
from aisec_train.federated.settings import ClientSettings
from aisec_train.federated.strategy import load_state
from aisec_train.train import checkpoint
from tests.conftest import read_report, run_cli

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.slow,  # ~100 s of real SuperLink/SuperNode processes: `pytest -m "slow or deployment"`
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="process cleanup reads /proc (Linux)"),
]
MARKER = "AISEC_FED_TEST_ID"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def marked_pids(token: str) -> list[int]:
    """Live processes whose environment carries this test's marker (only ones this test started)."""
    needle, pids = f"{MARKER}={token}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is already dead; its parent reaps it
                    pids.append(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return pids


class LocalFederation:
    """A TLS SuperLink with SuperNode authentication and ``nodes`` registered SuperNodes on 127.0.0.1,
    torn down (SIGTERM, then SIGKILL) however the test ends."""

    def __init__(self, root: Path, client: ClientSettings, nodes: int) -> None:
        self.root, self.client, self.nodes = root, client, nodes
        self.token = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.port = free_port()
        self.creds = write_tls(root / "creds", "127.0.0.1")
        self.address = f"127.0.0.1:{self.port}"

    def _env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        bindir = str(Path(sys.executable).parent)  # flower-superexec is found on PATH by the SuperLink
        return {
            **os.environ,
            MARKER: self.token,
            "FLWR_HOME": str(home),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        }

    def _start(self, name: str, cmd: list[str], home: Path) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self._env(home), start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def supernode(self, pid: int, key: Path, name: str, max_wait_s: int = 300) -> subprocess.Popen:
        cmd = supernode_command(
            self.client,
            pid,
            superlink=self.address,
            runtime_port=free_port(),
            insecure=False,
            root_certificates=str(self.creds["ca"]),
            auth_key=str(key),
        )
        return self._start(name, [*cmd, "--max-wait-time", str(max_wait_s)], self.root / f"{name}_home")

    def __enter__(self) -> LocalFederation:
        try:
            link = self._start(
                "superlink",
                [
                    flwr_executable("flower-superlink"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--ssl-ca-certfile",
                    str(self.creds["ca"]),
                    "--ssl-certfile",
                    str(self.creds["cert"]),
                    "--ssl-keyfile",
                    str(self.creds["key"]),
                    "--enable-supernode-auth",
                    "--disable-runtime-dependency-installation",
                ],
                self.root / "superlink_home",
            )
            self._wait_listening(link, timeout_s=90)
            home = write_flower_home(
                self.root / "admin_home", DeploymentConfig(self.address, root_certificates=str(self.creds["ca"]))
            )
            for pid in range(self.nodes):
                private, public = write_node_key(self.root / "creds", f"supernode_{pid}")
                register = subprocess.run(
                    [flwr_executable(), "supernode", "register", str(public), CONNECTION],
                    env=self._env(home),
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert register.returncode == 0, register.stdout + register.stderr
                self.supernode(pid, private, f"supernode{pid}")
        except BaseException:
            self.close()
            raise
        return self

    def _wait_listening(self, proc: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {proc.returncode}:\n{self.tails()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"flower-superlink did not listen on 127.0.0.1:{self.port} in {timeout_s}s:\n{self.tails()}")

    def tails(self, chars: int = 1500) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in self.logs if log.exists()
        )

    def close(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in set(marked_pids(self.token)) | {p.pid for p in self.procs if p.poll() is None}:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (
                marked_pids(self.token) or any(p.poll() is None for p in self.procs)
            ):
                time.sleep(0.2)
        for proc in self.procs:
            proc.wait(timeout=5)

    def __exit__(self, *exc) -> None:
        self.close()


def test_two_encrypted_rounds_on_a_real_superlink_and_two_supernodes(tmp_path):
    run_dir = tmp_path / "run"
    # The SuperNodes are told where this run's job, ledgers and secret context will be; the job creates them.
    client = ClientSettings(
        job=str(run_dir / "federated" / "job.json"),
        state_dir=str(run_dir / "client_state"),
        secret_context=str(run_dir / "client_keys" / "ckks_secret.ctx"),
    )
    federation = LocalFederation(tmp_path, client, nodes=2)
    try:
        with federation:
            # A SuperNode whose key was never registered is turned away by the SuperLink.
            rogue_key, _ = write_node_key(tmp_path / "rogue", "supernode_rogue")
            rogue = federation.supernode(0, rogue_key, "rogue", max_wait_s=30)
            proc = run_cli(
                "experiment=federated_he",
                f"hydra.run.dir={run_dir}",
                "audit=off",
                "robustness.evaluate=false",
                "federated.engine=deployment",
                f"federated.deployment.superlink={federation.address}",
                f"federated.deployment.root_certificates={federation.creds['ca']}",
                "federated.deployment.timeout_s=240",
                "federated.clients=2",
                "federated.rounds=2",
                "federated.local_epochs=1",
                "federated.evaluate=false",
                "federated.round_timeout_s=120",
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr[-3000:] + federation.tails()
            assert rogue.wait(timeout=60) != 0
            assert "Failed to activate SuperNode" in (tmp_path / "rogue.log").read_text()
    finally:
        leftovers = marked_pids(federation.token)
    assert not leftovers, f"processes left behind: {leftovers}"

    report = read_report(run_dir)
    fed = report["federated"]
    assert fed["engine"] == "deployment" and fed["aggregation"] == "ckks" and fed["rounds"] == 2
    assert fed["transport"] == f"tls to {federation.address}, CA ca.crt"
    assert [r["accepted"] for r in fed["per_round"]] == [[0, 1], [0, 1]]
    assert fed["bytes_per_param"] <= 40 and not fed["failed_rounds"]
    assert all(r["aggregate_s"] > 0 and r["encrypt_s"] > 0 for r in fed["per_round"])
    # Without evaluation rounds, round 1's aggregate is decrypted by the clients when round 2 starts.
    assert fed["per_round"][0]["decrypt_s"] > 0
    # The server kept only ciphertext; each SuperNode's ClientApp trained both rounds on its own ledger.
    assert load_state(run_dir / "federated" / "server")["model"]["kind"] == "ckks"
    for pid in (0, 1):
        ledger = checkpoint.load(run_dir / "client_state" / f"client_{pid}" / "state.pt")
        assert ledger["rounds"] == [1, 2]
    assert report["privacy"]["epsilon"] <= 3.0 + 1e-9
    assert report["metrics"]["clean_accuracy"] > 0.2  # the decrypted global model learned (chance is 0.1)
    # The app the SuperLink installed carries the server's settings only.
    installed = list((tmp_path / "superlink_home" / "apps").rglob("pyproject.toml"))
    assert installed and all("secret" not in p.read_text() for p in installed)

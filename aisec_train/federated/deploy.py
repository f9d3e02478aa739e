"""Deployment engine: the job submits the same apps to a running ``flower-superlink`` with ``flower-supernode``s.

``federated.engine=deployment`` writes a Flower App folder (``federated/aisecfed/pyproject.toml``) whose run
config holds the *server's* settings only (job, state folder, public context), points a private
``FLWR_HOME`` at the SuperLink (TLS with a CA bundle, or plain HTTP on the loopback interface only), runs
``flwr run --stream`` and waits for the run to finish. SuperNodes get their settings, the secret context
among them, from their own ``--node-config``; :func:`supernode_command` prints it for each partition.
The job reads the server's round state and the clients' ledgers from the paths in those configs, so it
must share a filesystem with the SuperLink and SuperNodes (one host, or a cluster's shared disk); see
docs/federated.md for separate sites.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from aisec_train.config import Config
from aisec_train.errors import ConfigError
from aisec_train.federated.config import DeploymentConfig
from aisec_train.federated.settings import ClientSettings, ServerSettings
from aisec_train.store.errors import IntegrityError
from aisec_train.store.files import atomic_write, open_live

log = logging.getLogger("aisec_train.federated")
APP_NAME = "aisecfed"  # the Flower App's project name (also its folder name)
CONNECTION = "aisec"  # the SuperLink connection in this run's private FLWR_HOME


class DeploymentError(RuntimeError):
    """The SuperLink refused the run, or the run failed, stopped or timed out."""


def flwr_executable(name: str = "flwr") -> str:
    """Flower's console scripts from this interpreter's environment first (a venv need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise DeploymentError(f"{name} is not installed; pip install 'flwr[simulation]==1.42.0'")
    return found


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_app(app_dir: Path, server: ServerSettings) -> Path:
    """The Flower App: components from the installed package, run config = the server's settings only."""
    app_dir.mkdir(parents=True, exist_ok=True)
    check_app_folder(app_dir)
    config = "\n".join(f"{k} = {_toml_str(v)}" for k, v in server.to_map().items())
    text = f"""\
# Written by aisec-train for one run (federated.engine=deployment). The apps come from the installed
# aisec_train package; the run config carries the server's settings and never a client key path.
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "aisec-train federated apps (DP-SGD clients, CKKS-encrypted FedAvg)"
license = "Apache-2.0"
dependencies = ["flwr>=1.42"]

[tool.flwr.app]
publisher = "aisec-train"

[tool.flwr.app.components]
serverapp = "aisec_train.federated.server_app:app"
clientapp = "aisec_train.federated.client_app:app"

[tool.flwr.app.config]
{config}
"""
    atomic_write(app_dir / "pyproject.toml", text, root=app_dir)
    return app_dir


def check_app_folder(app_dir: Path) -> None:
    """Refuse an app folder holding anything but our ``pyproject.toml`` (a resumed run's folder may have been
    written by someone else). ``flwr run`` packs every ``.py``, ``.toml``, ``.json``, ... file of the folder into the
    app it ships, and the ServerApp and each SuperNode's ClientApp put it first on ``sys.path``: a planted
    ``aisec_train/federated/client_app.py`` there would run instead of the installed package, on every client."""
    planted = sorted(p.name for p in app_dir.iterdir() if p.name != "pyproject.toml")
    if planted:
        raise IntegrityError(
            f"{app_dir} holds {', '.join(planted[:5])}{' ...' if len(planted) > 5 else ''}: aisec-train writes only "
            "pyproject.toml there, and flwr run would ship the rest to the ServerApp and every SuperNode as code "
            "they import before the installed aisec_train; remove it, or use another hydra.run.dir"
        )


def write_flower_home(home: Path, dep: DeploymentConfig) -> Path:
    """A private Flower configuration with one SuperLink connection, so the user's ~/.flwr is untouched."""
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f"default = {_toml_str(CONNECTION)}",
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {_toml_str(dep.superlink)}",
    ]
    if dep.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_str(str(Path(dep.root_certificates).resolve()))}")
    atomic_write(home / "config.toml", "\n".join(lines) + "\n", root=home)
    return home


def supernode_command(
    client: ClientSettings,
    partition_id: int,
    *,
    superlink: str,
    runtime_port: int,
    insecure: bool,
    root_certificates: str | None = None,
    auth_key: str | None = None,
) -> list[str]:
    """The ``flower-supernode`` command for one partition (TLS and node authentication unless insecure)."""
    node = {"partition-id": partition_id, **client.to_map()}
    node_config = " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={_toml_str(v)}" for k, v in node.items())
    cmd = [
        flwr_executable("flower-supernode"),
        "--superlink",
        superlink,
        "--port",
        str(runtime_port),
        "--node-config",
        node_config,
    ]
    if insecure:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(root_certificates)]
    return [*cmd, "--auth-supernode-private-key", str(auth_key)] if auth_key else cmd


def _env(home: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(home), "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def _status(run_id: int, env: dict[str, str]) -> str:
    out = subprocess.run(
        [flwr_executable(), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return json.loads(out.stdout)["runs"][0]["status"]
    except (ValueError, KeyError, IndexError) as err:
        raise DeploymentError(
            f"flwr ls could not report run {run_id}: {out.stdout[-500:]} {out.stderr[-500:]}"
        ) from err


def run_deployment(cfg: Config, server: ServerSettings, client: ClientSettings, fed_dir: Path) -> str:
    """Submit the run to the SuperLink, stream its log to ``fed_dir/flwr_run.log`` and wait for the end.

    Returns the transport the report records.
    """
    dep = cfg.federated.deployment
    app, home = write_app(fed_dir / APP_NAME, server), write_flower_home(fed_dir / "flwr_home", dep)
    env = _env(home)
    for pid in range(cfg.federated.clients):
        cmd = supernode_command(
            client,
            pid,
            superlink=dep.superlink,
            runtime_port=9094 + pid,
            insecure=dep.insecure,
            root_certificates=dep.root_certificates,
            auth_key="<this node's private key>",
        )
        log.info("SuperNode %d: %s", pid, shlex.join(cmd))
    log_path = fed_dir / "flwr_run.log"
    with open_live(log_path, root=fed_dir, mode="w") as out:  # in place: readable while the run streams
        try:
            proc = subprocess.run(
                [flwr_executable(), "run", str(app), CONNECTION, "--stream"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=dep.timeout_s,
            )
        except subprocess.TimeoutExpired as err:
            run_id = _run_id(log_path.read_text())
            if run_id is not None:  # leave no orphaned run on the SuperLink
                subprocess.run(
                    [flwr_executable(), "stop", str(run_id), CONNECTION], env=env, capture_output=True, timeout=120
                )
            raise DeploymentError(
                f"the deployment run passed federated.deployment.timeout_s={dep.timeout_s} and was "
                f"stopped; log: {log_path}"
            ) from err
    text = log_path.read_text()
    run_id = _run_id(text)
    if run_id is None:  # nothing ran: the address, the certificate or the SuperLink itself is wrong
        raise ConfigError(
            f"federated.deployment.superlink={dep.superlink!r} is not allowed: flwr run could not start "
            f"a run there ({_cli_error(text)}); log: {log_path}"
        )
    if proc.returncode != 0:
        raise DeploymentError(f"flwr run {run_id} failed (exit {proc.returncode}): {_cli_error(text)}; log: {log_path}")
    status = _status(run_id, env)
    if status != "finished:completed":
        raise DeploymentError(f"run {run_id} ended {status}; log: {log_path}")
    log.info("deployment run %d %s", run_id, status)
    if dep.insecure:
        return f"insecure HTTP to {dep.superlink} (loopback only)"
    return f"tls to {dep.superlink}, CA {Path(dep.root_certificates).name}"


def _cli_error(text: str) -> str:
    """The message inside the Flower CLI's error box, on one line."""
    box = text.split("Error", 1)[1] if "Error ─" in text else text[-600:]
    return " ".join(box.translate(str.maketrans("", "", "│╭╮╰╯─")).split())[:400]


def _run_id(text: str) -> int | None:
    marker = "Successfully started run "
    for line in text.splitlines():
        if marker in line:
            return int(line.split(marker, 1)[1].split()[0])
    return None

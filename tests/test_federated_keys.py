"""Key handling: the server side holds a public context only and its code path never touches client keys."""

from __future__ import annotations

import ast
import json
import stat
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from aisec_train.crypto import CkksParams, encrypt_update, generate_keys, load_public_context, load_secret_context
from aisec_train.federated import server_app, strategy
from aisec_train.federated.deploy import supernode_command, write_app
from aisec_train.federated.settings import ClientSettings, ServerSettings
from tests.conftest import REPO

SECRET_READERS = {"load_secret_context", "decrypt_aggregate", "encrypt_update", "ClientSettings"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedkeys")
    return root, generate_keys(CkksParams(), root / "client_keys", root / "server")


def test_server_context_is_public_and_cannot_decrypt(keys):
    _, paths = keys
    secret, public = load_secret_context(paths.secret_context), load_public_context(paths.public_context)
    assert secret.is_private() and not public.is_private()
    assert not public.has_secret_key() and not public.has_relin_keys() and not public.has_galois_keys()
    blob = encrypt_update(np.linspace(-1, 1, 100), 3, secret).chunks[0]
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(public, blob).decrypt()
    assert len(paths.public_context.read_bytes()) < 1000  # parameters only: no key of any kind travels
    assert stat.S_IMODE(paths.secret_context.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.secret_context.parent.stat().st_mode) == 0o700


def _imported_names(module) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_server_modules_cannot_reach_a_secret_and_their_settings_have_no_place_for_one():
    for module in (server_app, strategy):
        assert not _imported_names(module) & SECRET_READERS, module.__name__
    assert not [f.name for f in fields(ServerSettings) if "secret" in f.name]
    assert {"secret_context", "secret_sha256"} <= {f.name for f in fields(ClientSettings)}


def test_deployment_app_config_carries_server_settings_only(tmp_path, keys):
    _, paths = keys
    server = ServerSettings("job.json", "state", str(paths.public_context), paths.public_sha256)
    app = write_app(tmp_path / "aisecfed", server)
    run_config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config == server.to_map()
    assert "secret" not in (app / "pyproject.toml").read_text()
    client = ClientSettings("job.json", "cstate", str(paths.secret_context), paths.secret_sha256)
    cmd = supernode_command(
        client,
        1,
        superlink="10.0.0.1:9093",
        runtime_port=9095,
        insecure=False,
        root_certificates="ca.crt",
        auth_key="node.key",
    )
    assert "--insecure" not in cmd and cmd[cmd.index("--root-certificates") + 1] == "ca.crt"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == "node.key"
    assert str(paths.secret_context) in cmd[cmd.index("--node-config") + 1]


SERVER_SIDE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    opened = []
    def hook(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))
    sys.addaudithook(hook)
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from aisec_train.crypto.ckks import EncryptedUpdate
    from aisec_train.federated.settings import ServerSettings
    from aisec_train.federated.strategy import SecureFedAvg, ckks_record
    args = json.loads(sys.argv[1])
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    s = ServerSettings(job="", state_dir=args["state"], public_context=args["public"], public_sha256=args["sha"])
    strategy = SecureFedAvg(aggregation="ckks", min_clients=2, max_update_norm=10.0, state_dir=s.state_dir,
                            public_context=s.public_context, public_sha256=s.public_sha256)
    class Nodes:
        def get_node_ids(self):
            return [1, 2, 3]
    msgs = strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), Nodes())
    replies = []
    for i, (msg, blob) in enumerate(zip(msgs, args["uploads"])):
        update = EncryptedUpdate.from_bytes(Path(blob).read_bytes())
        metrics = MetricRecord({"partition-id": i, "num-examples": update.weight, "refused": 0})
        replies.append(Message(RecordDict({"arrays": ckks_record(update), "metrics": metrics}), reply_to=msg))
    arrays, summary = strategy.aggregate_train(1, replies)
    print(json.dumps({"opened": opened, "accepted": summary["accepted"], "private": strategy.public_ctx.is_private()}))
""")


def test_server_code_path_never_opens_client_key_material(tmp_path, keys):
    """Run the server's aggregation in its own process under an audit hook that records every file it opens."""
    root, paths = keys
    secret = load_secret_context(paths.secret_context)
    uploads = []
    for i, n in enumerate((30, 50, 20)):  # the clients encrypt (this process holds the secret)
        path = tmp_path / f"upload_{i}.bin"
        path.write_bytes(encrypt_update(np.full(5000, 0.01 * (i + 1)), n, secret).to_bytes())
        uploads.append(str(path))
    args = {
        "state": str(tmp_path / "state"),
        "public": str(paths.public_context),
        "sha": paths.public_sha256,
        "uploads": uploads,
    }
    proc = subprocess.run(
        [sys.executable, "-c", SERVER_SIDE, json.dumps(args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["accepted"] == 3 and out["private"] is False
    opened = [Path(p).resolve() for p in out["opened"]]
    assert Path(args["public"]).resolve() in opened, "the recorder did not see the public context being read"
    key_dir = paths.secret_context.parent.resolve()
    assert not [p for p in opened if p.is_relative_to(key_dir)], "the server process touched client key material"

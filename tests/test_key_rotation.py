"""Per-epoch CKKS key rotation with real TenSEAL: old keys cannot read new ciphertexts, the server holds none."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tenseal as ts

from aisec_train.crypto import (
    CkksParams,
    InvalidCiphertextError,
    aggregate,
    decrypt_aggregate,
    encrypt_update,
    load_public_context,
)
from aisec_train.crypto.rotation import (
    epoch_of,
    load_epoch_public,
    load_epoch_secret,
    reencrypt,
    retire,
    rotate_keys,
    tag,
    untag,
)
from aisec_train.errors import ConfigError
from tests.conftest import REPO


@pytest.fixture
def roots(tmp_path):
    client, server = tmp_path / "client_keys", tmp_path / "server_keys"
    keys = [rotate_keys(CkksParams(), client, server, epoch) for epoch in (0, 1)]
    return client, server, keys


def _decrypt_or_garbage(data: bytes, secret: ts.Context, truth: np.ndarray) -> bool:
    """True when ``secret`` fails to recover ``truth``: TenSEAL gives garbage, decrypt_aggregate refuses it."""
    try:
        got = decrypt_aggregate(data, secret)
    except ValueError:
        return True
    return float(np.abs(got - truth).max()) > 1.0


def test_epochs_follow_the_rotation_period():
    assert [epoch_of(r, 1) for r in (1, 2, 3)] == [0, 1, 2]
    assert [epoch_of(r, 3) for r in (1, 3, 4, 6, 7)] == [0, 0, 1, 1, 2]
    with pytest.raises(ConfigError, match="federated.ckks.rotate_every=0 is not allowed"):
        epoch_of(1, 0)


def test_after_rotation_the_old_key_cannot_decrypt_new_ciphertexts(roots):
    client, _, keys = roots
    (old, old_id), (new, new_id) = load_epoch_secret(client, 0), load_epoch_secret(client, 1)
    assert old_id != new_id and keys[1].secret_sha256 != keys[0].secret_sha256
    x = np.linspace(-1, 1, 3000)
    fresh = encrypt_update(x, 2, new).to_bytes()
    np.testing.assert_allclose(decrypt_aggregate(fresh, new), x, atol=1e-6)
    assert _decrypt_or_garbage(fresh, old, x)  # the old key holder reads nothing
    assert _decrypt_or_garbage(encrypt_update(x, 2, old).to_bytes(), new, x)  # and the reverse


def test_reencryption_carries_the_aggregate_across_a_rotation(roots):
    client, server, _ = roots
    (old, _), (new, _) = load_epoch_secret(client, 0), load_epoch_secret(client, 1)
    public0, _ = load_epoch_public(server, 0)
    rng = np.random.default_rng(0)
    xs, weights = [rng.normal(0, 0.05, 5000) for _ in range(3)], [3, 10, 7]
    agg = aggregate([encrypt_update(x, w, old) for x, w in zip(xs, weights, strict=True)], public0)
    moved = reencrypt(agg.to_bytes(), old, new)  # by a key holder, never the server
    assert moved.weight == agg.weight == 20 and moved.length == agg.length
    expected = np.average(xs, axis=0, weights=weights)
    np.testing.assert_allclose(decrypt_aggregate(moved, new), expected, atol=1e-6)
    assert _decrypt_or_garbage(moved.to_bytes(), old, expected)


def test_the_server_refuses_uploads_under_a_stale_key(roots):
    client, server, keys = roots
    (old, old_id), (new, new_id) = load_epoch_secret(client, 0), load_epoch_secret(client, 1)
    public1, expected_id = load_epoch_public(server, 1)
    assert expected_id == new_id == keys[1].key_id
    good = tag(encrypt_update(np.ones(10), 1, new), new_id)
    stale = tag(encrypt_update(np.ones(10), 1, old), old_id)  # a client that missed the rotation
    assert aggregate([untag(good, expected_id)], public1).weight == 1
    with pytest.raises(InvalidCiphertextError, match="stale or foreign key") as info:
        untag(stale, expected_id)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidCiphertextError, match="no key id"):
        untag(encrypt_update(np.ones(10), 1, new).to_bytes(), expected_id)


def test_server_folders_hold_public_contexts_only_and_secrets_are_private(roots):
    client, server, keys = roots
    for epoch in (0, 1):
        ctx, _ = load_epoch_public(server, epoch)
        assert not ctx.is_private() and not ctx.has_secret_key()
        assert stat.S_IMODE(keys[epoch].secret_context.stat().st_mode) == 0o600
    assert not list(server.rglob("ckks_secret*"))
    with pytest.raises(ValueError, match="the server must be given the public context only"):
        load_public_context(keys[0].secret_context)


def test_retired_secrets_are_destroyed(roots):
    client, _, keys = roots
    assert retire(client, before_epoch=1) == [keys[0].secret_context]
    assert not keys[0].secret_context.exists() and keys[1].secret_context.exists()
    with pytest.raises(FileNotFoundError, match="epoch 0 was never created or was retired"):
        load_epoch_secret(client, 0)
    with pytest.raises(FileExistsError):  # an epoch's keys are never silently replaced
        rotate_keys(CkksParams(), client, client.parent / "server_keys", 1)


SERVER_SIDE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    opened = []
    def hook(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, Path)):
            opened.append(str(args[0]))
    sys.addaudithook(hook)
    from aisec_train.crypto import aggregate
    from aisec_train.crypto.rotation import load_epoch_public, untag
    args = json.loads(sys.argv[1])
    out = {"opened": opened, "private": [], "weights": []}
    for epoch, uploads in enumerate(args["uploads"]):
        ctx, key_id = load_epoch_public(Path(args["server"]), epoch)
        agg = aggregate([untag(Path(p).read_bytes(), key_id) for p in uploads], ctx)
        out["private"].append(ctx.is_private())
        out["weights"].append(agg.weight)
    print(json.dumps(out))
""")


def test_the_server_code_path_never_opens_client_key_material_across_epochs(roots, tmp_path):
    client, server, _ = roots
    uploads = []
    for epoch in (0, 1):
        secret, key_id = load_epoch_secret(client, epoch)
        paths = []
        for i in range(2):
            path = tmp_path / f"upload_{epoch}_{i}.bin"
            path.write_bytes(tag(encrypt_update(np.full(3000, 0.01 * (i + 1)), 5, secret), key_id))
            paths.append(str(path))
        uploads.append(paths)
    args = json.dumps({"server": str(server), "uploads": uploads})
    proc = subprocess.run(
        [sys.executable, "-c", SERVER_SIDE, args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["private"] == [False, False] and out["weights"] == [10, 10]
    opened = [p for p in out["opened"] if str(server) in p]
    assert opened, "the recorder did not see the public contexts being read"
    assert not [p for p in out["opened"] if str(client) in p], "the server process touched client key material"

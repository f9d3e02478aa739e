"""Key files go through the store's safe-write path: owner-only from creation, never written through a symlink."""

from __future__ import annotations

import stat

import pytest

from aisec_train.crypto import CkksParams, generate_keys
from aisec_train.federated.credentials import write_node_key, write_tls
from aisec_train.store.errors import IntegrityError


def _mode(path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_tls_private_key_refuses_a_planted_symlink_and_is_owner_only(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "creds"
    out.mkdir()
    (out / "superlink.key").symlink_to(victim)  # an attacker's link where the key will go
    with pytest.raises(IntegrityError, match="symlink"):
        write_tls(out, "127.0.0.1", days=1)
    assert victim.read_text() == "keep me"  # the old code opened with O_TRUNC and wrote the key into the victim
    (out / "superlink.key").unlink()
    paths = write_tls(out, "127.0.0.1", days=1)
    assert not paths["key"].is_symlink() and _mode(paths["key"]) == 0o600
    assert b"PRIVATE KEY" in paths["key"].read_bytes()
    private, public = write_node_key(out, "supernode_0")
    assert _mode(private) == 0o600 and not list(out.glob(".*.tmp"))


def test_ckks_secret_context_is_owner_only_and_leaves_no_temp(tmp_path):
    keys = generate_keys(CkksParams(), tmp_path / "client", tmp_path / "server")
    assert _mode(keys.secret_context) == 0o600
    assert not list((tmp_path / "client").glob("*.tmp")) and not list((tmp_path / "client").glob(".*.tmp"))
    assert (tmp_path / "server" / (keys.public_context.name + ".sha256")).read_text().strip() == keys.public_sha256

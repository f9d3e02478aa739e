"""Per-epoch CKKS key rotation: a fresh secret context every ``every`` rounds, for the clients only.

Epoch ``e`` covers rounds ``e*every + 1 .. (e+1)*every``. Its keys live in
``client_root/epoch_<e>/ckks_secret.ctx`` (mode 0600, clients only) and ``server_root/epoch_<e>/`` (the
public context: parameters only) with a random ``key_id`` beside each. The public context is the same
93 bytes in every epoch (it holds no key), so ciphertexts are bound to their epoch by the ``key_id``:
clients :func:`tag` each upload, the server :func:`untag` s it against the epoch it expects and refuses a
stale or foreign one, instead of summing ciphertexts under different keys into garbage.

Across a rotation: at the first round of epoch ``e`` a client decrypts the previous aggregate with epoch
``e-1``'s secret and encrypts its new upload under epoch ``e``'s. State the server keeps across rounds
under the old key (a resumed run's saved aggregate, a running encrypted sum) is carried over by a key
holder with :func:`reencrypt` (decrypt with the old key, encrypt under the new one); the server never
holds either secret. :func:`retire` then destroys old secrets.

What rotation buys: a secret that leaks later decrypts only its own epoch's ciphertexts, *if* the old
secrets were destroyed. What it does not: any key-holding client colluding with the server during an
epoch decrypts every update of that epoch (docs/federated.md, "Key custody").

Example::

    keys = rotate_keys(CkksParams(), client_root, server_root, epoch=epoch_of(rnd, every=5))   # key dealer
    wire = tag(encrypt_update(w, n, load_epoch_secret(client_root, e)), keys.key_id)            # client
    ctx, key_id = load_epoch_public(server_root, e)                                             # server
    agg = aggregate([untag(u, key_id) for u in uploads], ctx)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts

from aisec_train.crypto.ckks import (
    PUBLIC_FILE,
    SECRET_FILE,
    CkksParams,
    EncryptedUpdate,
    InvalidCiphertextError,
    decrypt_aggregate,
    encrypt_update,
    generate_keys,
    load_public_context,
    load_secret_context,
)
from aisec_train.errors import require
from aisec_train.store.files import atomic_write, shred

KEY_ID_FILE = "key_id"
_MAGIC, _ID_BYTES = b"AKR1", 16


@dataclass(frozen=True)
class EpochKeys:
    epoch: int
    key_id: str  # 32 hex characters, random: names the key without revealing anything about it
    secret_context: Path
    public_context: Path
    secret_sha256: str
    public_sha256: str


def epoch_of(server_round: int, every: int) -> int:
    """The key epoch of a 1-based ``server_round`` when keys rotate every ``every`` rounds."""
    require(isinstance(every, int) and every >= 1, "federated.ckks.rotate_every", every, "use an integer >= 1")
    ok = isinstance(server_round, int) and server_round >= 1
    require(ok, "server_round", server_round, "rounds start at 1")
    return (server_round - 1) // every


def _epoch_dir(root: Path, epoch: int) -> Path:
    require(isinstance(epoch, int) and epoch >= 0, "epoch", epoch, "use an integer >= 0")
    return Path(root) / f"epoch_{epoch:05d}"


def rotate_keys(params: CkksParams, client_root: Path, server_root: Path, epoch: int) -> EpochKeys:
    """Key dealer: create epoch ``epoch``'s secret context (clients) and public context (server).

    Refuses to overwrite an existing epoch (its ciphertexts would become unreadable); call it once per epoch.
    """
    client_dir, server_dir = _epoch_dir(client_root, epoch), _epoch_dir(server_root, epoch)
    Path(client_root).mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = generate_keys(params, client_dir, server_dir)  # refuses overlapping folders and existing keys
    key_id = secrets.token_hex(_ID_BYTES)
    for folder in (client_dir, server_dir):
        atomic_write(folder / KEY_ID_FILE, key_id + "\n", root=folder)
    return EpochKeys(
        epoch, key_id, paths.secret_context, paths.public_context, paths.secret_sha256, paths.public_sha256
    )


def _read_key_id(folder: Path) -> str:
    path = folder / KEY_ID_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: epoch keys were not created with rotate_keys")
    return path.read_text().strip()


def load_epoch_public(server_root: Path, epoch: int) -> tuple[ts.Context, str]:
    """Server side: epoch ``epoch``'s public context (a secret one is refused) and its key id."""
    folder = _epoch_dir(server_root, epoch)
    return load_public_context(folder / PUBLIC_FILE), _read_key_id(folder)


def load_epoch_secret(client_root: Path, epoch: int) -> tuple[ts.Context, str]:
    """Client side: epoch ``epoch``'s secret context (mode 0600 checked) and its key id."""
    folder = _epoch_dir(client_root, epoch)
    if not (folder / SECRET_FILE).is_file():
        raise FileNotFoundError(f"{folder / SECRET_FILE} is missing: epoch {epoch} was never created or was retired")
    return load_secret_context(folder / SECRET_FILE), _read_key_id(folder)


def epochs(root: Path) -> dict[str, int]:
    """Every epoch under ``root`` (a client or server root) by its key id."""
    found = {}
    for folder in sorted(Path(root).glob("epoch_*")):
        if (folder / KEY_ID_FILE).is_file():
            found[_read_key_id(folder)] = int(folder.name.split("_")[1])
    return found


def is_tagged(data: bytes) -> bool:
    return bytes(data[: len(_MAGIC)]) == _MAGIC


def key_id_of(data: bytes) -> str:
    """The key id a tagged upload or aggregate names (checked against nothing: :func:`untag` checks)."""
    if not is_tagged(data) or len(data) < len(_MAGIC) + _ID_BYTES:
        raise InvalidCiphertextError("payload carries no key id: it was not tagged with rotation.tag")
    return bytes(data[len(_MAGIC) : len(_MAGIC) + _ID_BYTES]).hex()


def tag(update: EncryptedUpdate, key_id: str) -> bytes:
    """Client side: the upload's bytes, prefixed with the id of the key it was encrypted under."""
    return _MAGIC + bytes.fromhex(key_id) + update.to_bytes()


def untag(data: bytes, expected_key_id: str) -> EncryptedUpdate:
    """Server side: the update, if it was encrypted under ``expected_key_id``; anything else is refused."""
    data = bytes(data)
    head = len(_MAGIC) + _ID_BYTES
    if len(data) < head or data[: len(_MAGIC)] != _MAGIC:
        raise InvalidCiphertextError("upload carries no key id: it was not tagged with rotation.tag")
    got = data[len(_MAGIC) : head].hex()
    if got != expected_key_id:
        raise InvalidCiphertextError(
            f"upload is under key {got[:8]}..., this round expects {expected_key_id[:8]}...: a stale or foreign key"
        )
    return EncryptedUpdate.from_bytes(data[head:])


def reencrypt(aggregate: EncryptedUpdate | bytes, old_secret: ts.Context, new_secret: ts.Context) -> EncryptedUpdate:
    """Key holder: the same weighted sum (and weight) under the new key. Error ~1e-7, as one encryption."""
    agg = aggregate if isinstance(aggregate, EncryptedUpdate) else EncryptedUpdate.from_bytes(aggregate)
    mean = decrypt_aggregate(agg, old_secret)  # the sum over the total weight
    return encrypt_update(mean, agg.weight, new_secret)  # weight x mean: the same sum, same weight


def retire(client_root: Path, before_epoch: int) -> list[Path]:
    """Destroy the secret contexts of epochs ``< before_epoch`` (overwritten, then removed); return them.

    Best effort: copies a filesystem or backup keeps are beyond reach; keep the client root off backups.
    """
    destroyed = []
    for folder in sorted(Path(client_root).glob("epoch_*")):
        secret = folder / SECRET_FILE
        # shred refuses a symlinked epoch folder or secret file: followed, it would overwrite its target
        if int(folder.name.split("_")[1]) < before_epoch and shred(secret, root=client_root):
            destroyed.append(secret)
    return destroyed

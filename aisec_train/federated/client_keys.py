"""The clients' side of CKKS key custody: decrypt the aggregate a round starts from, encrypt this round's upload.

One key per run (``secret_context``) or, with ``federated.ckks.rotate_every=k``, one per epoch of ``k`` rounds
(``secret_root/epoch_<e>/``, :mod:`aisec_train.crypto.rotation`): an upload is encrypted under its round's
epoch and tagged with that key's id; an aggregate names its key by the same tag, so a client decrypts a
model kept from an older epoch (a failed round keeps the global model) with the right key. Client code only:
the server side (``strategy.py``) reads public contexts and key ids, never this module.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import tenseal as ts

from aisec_train.crypto.ckks import (
    EncryptedUpdate,
    InvalidCiphertextError,
    decrypt_aggregate,
    encrypt_update,
    load_secret_context,
)
from aisec_train.crypto.rotation import epoch_of, epochs, is_tagged, key_id_of, load_epoch_secret, tag, untag
from aisec_train.federated.settings import ClientSettings


@lru_cache(maxsize=8)
def _secret(path: str, sha256: str) -> ts.Context:
    return load_secret_context(Path(path), sha256 or None)


@lru_cache(maxsize=32)
def _epoch_secret(root: str, epoch: int) -> tuple[ts.Context, str]:
    return load_epoch_secret(Path(root), epoch)


class ClientKeys:
    def __init__(self, settings: ClientSettings):
        self.s = settings

    @property
    def encrypts(self) -> bool:
        return bool(self.s.secret_context or self.s.secret_root)

    def decrypt(self, payload: bytes) -> np.ndarray:
        """The aggregate's mean (a tagged one with the epoch key its tag names)."""
        # Whether and how it is tagged is the sender's say: a tag this client holds no key for is an invalid
        # aggregate (answered as a refusal), not a missing file.
        if not is_tagged(payload):
            if not self.s.secret_context:
                raise InvalidCiphertextError("an aggregate without a key id, in a run whose keys rotate")
            return decrypt_aggregate(payload, _secret(self.s.secret_context, self.s.secret_sha256))
        key_id = key_id_of(payload)
        epoch = epochs(Path(self.s.secret_root)).get(key_id) if self.s.secret_root else None
        if epoch is None:
            raise InvalidCiphertextError(f"no epoch key of this client has id {key_id[:8]}... (retired, or foreign)")
        ctx, _ = _epoch_secret(self.s.secret_root, epoch)
        return decrypt_aggregate(untag(payload, key_id), ctx)

    def encrypt(self, vector: np.ndarray, weight: int, server_round: int, rotate_every: int) -> EncryptedUpdate | bytes:
        """``weight * vector`` under the run's key, or under this round's epoch key, tagged."""
        if not self.s.secret_root:
            return encrypt_update(vector, weight, _secret(self.s.secret_context, self.s.secret_sha256))
        ctx, key_id = _epoch_secret(self.s.secret_root, epoch_of(server_round, rotate_every))
        return tag(encrypt_update(vector, weight, ctx), key_id)

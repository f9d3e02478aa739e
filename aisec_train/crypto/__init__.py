"""Homomorphic encryption for federated aggregation (TenSEAL CKKS)."""

from aisec_train.crypto.ckks import (
    CkksParams,
    EncryptedUpdate,
    InvalidCiphertextError,
    KeyPaths,
    aggregate,
    decrypt_aggregate,
    encrypt_update,
    generate_keys,
    load_public_context,
    load_secret_context,
    self_test,
    value_bound,
)

__all__ = [
    "CkksParams",
    "EncryptedUpdate",
    "InvalidCiphertextError",
    "KeyPaths",
    "aggregate",
    "decrypt_aggregate",
    "encrypt_update",
    "generate_keys",
    "load_public_context",
    "load_secret_context",
    "self_test",
    "value_bound",
]

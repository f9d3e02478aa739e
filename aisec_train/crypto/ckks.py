"""CKKS-encrypted FedAvg: key generation, client-side encryption, server-side addition, client decryption.

Trust split: clients hold the *secret* context (they encrypt and decrypt); the server holds only a
*public* context (parameters, no keys at all) and can do nothing but add ciphertexts. Each client
multiplies its update by its weight (an example count) in plaintext before encrypting, so the server
needs no scalar multiply and no rescale, which is why one data prime is enough (see docs/he_parameters.md).

Example::

    keys = generate_keys(CkksParams(), client_dir, server_dir)
    ctx = load_secret_context(keys.secret_context)
    ups = [encrypt_update(u, n, ctx) for u, n in client_updates]          # on each client
    agg = aggregate([u.to_bytes() for u in ups], keys.public_context)     # on the server
    mean = decrypt_aggregate(agg, ctx)                                    # on each client, next round
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tenseal as ts
import torch

from aisec_train.store.files import atomic_write

__all__ = [
    "CkksParams",
    "EncryptedUpdate",
    "InvalidCiphertextError",
    "KeyPaths",
    "aggregate",
    "check_upload",
    "decrypt_aggregate",
    "encrypt_update",
    "generate_keys",
    "load_public_context",
    "load_secret_context",
    "self_test",
    "value_bound",
]

EncryptionType = Literal["symmetric", "asymmetric"]

# SEAL's HomomorphicEncryption.org 128-bit limits on the total coefficient-modulus bits per ring degree.
MAX_COEFF_BITS_128: dict[int, int] = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
SECRET_FILE = "ckks_secret.ctx"
PUBLIC_FILE = "ckks_public.ctx"


class InvalidCiphertextError(ValueError):
    """A payload that is not a well-formed encrypted update for this context."""


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters. Defaults: the fewest wire bytes per parameter at FedAvg error <= 1e-6.

    The last prime of ``coeff_mod_bit_sizes`` is SEAL's special (key-switching) prime and never travels;
    fresh ciphertexts carry the others, so the wire cost is about ``sum(data primes) / 2`` bytes per value.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (50, 30)
    global_scale_bits: int = 30
    # Symmetric (secret-key) encryption has ~10x less fresh noise and encrypts 2x faster; clients hold
    # the secret key anyway, and the server needs no key at all to add.
    encryption: EncryptionType = "symmetric"

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if n not in MAX_COEFF_BITS_128:
            allowed = sorted(MAX_COEFF_BITS_128)
            raise ValueError(f"poly_modulus_degree={n!r} is not allowed; use one of {allowed}")
        # TenSEAL always builds relinearisation keys, so SEAL needs a special prime besides a data prime.
        if len(bits) < 2 or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
            raise ValueError(f"coeff_mod_bit_sizes={list(bits)!r} is not allowed; use >= 2 integer bit sizes in 20..60")
        if sum(bits) > MAX_COEFF_BITS_128[n]:
            raise ValueError(
                f"coeff_mod_bit_sizes={list(bits)!r} totals {sum(bits)} bits; 128-bit security at "
                f"poly_modulus_degree={n} allows at most {MAX_COEFF_BITS_128[n]}"
            )
        s = self.global_scale_bits
        if not isinstance(s, int) or not 10 <= s <= self.data_bits - 3:
            raise ValueError(
                f"global_scale_bits={s!r} is not allowed; use an integer in 10..{self.data_bits - 3} "
                f"(data primes {list(bits[:-1])} minus headroom)"
            )
        if self.encryption not in ("symmetric", "asymmetric"):
            raise ValueError(f"encryption={self.encryption!r} is not allowed; use 'symmetric' or 'asymmetric'")

    @property
    def data_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def make_context(self) -> ts.Context:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            self.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
            encryption_type=getattr(ts.ENCRYPTION_TYPE, self.encryption.upper()),
        )
        ctx.global_scale = 2.0**self.global_scale_bits
        return ctx


@dataclass(frozen=True)
class KeyPaths:
    secret_context: Path
    public_context: Path
    secret_sha256: str
    public_sha256: str


@dataclass(frozen=True)
class EncryptedUpdate:
    """A weighted update as serialized ciphertexts: bytes and ints only, nothing to unpickle."""

    chunks: tuple[bytes, ...]
    length: int
    weight: int

    _HEADER = struct.Struct("<4sQQI")  # magic, length, weight, number of chunks
    _MAGIC = b"AHE1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", tuple(self.chunks))
        if not all(isinstance(c, bytes) and c for c in self.chunks) or not self.chunks:
            raise InvalidCiphertextError("an encrypted update needs >= 1 non-empty bytes chunk")
        if not _is_int(self.length) or self.length < 1:
            raise InvalidCiphertextError(f"length={self.length!r} must be an integer >= 1")
        if not _is_int(self.weight) or self.weight < 1:
            raise InvalidCiphertextError(f"weight={self.weight!r} must be an integer >= 1")

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (the framing of ``to_bytes`` included)."""
        return self._HEADER.size + sum(8 + len(c) for c in self.chunks)

    def to_bytes(self) -> bytes:
        parts = [self._HEADER.pack(self._MAGIC, self.length, self.weight, len(self.chunks))]
        for chunk in self.chunks:
            parts += [struct.pack("<Q", len(chunk)), chunk]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedUpdate:
        """Strict parse of ``to_bytes`` output; anything else raises InvalidCiphertextError."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) < cls._HEADER.size:
            raise InvalidCiphertextError("encrypted update is truncated or not bytes")
        data = bytes(data)
        magic, length, weight, count = cls._HEADER.unpack_from(data)
        if magic != cls._MAGIC:
            raise InvalidCiphertextError(f"encrypted update has magic {magic!r}, expected {cls._MAGIC!r}")
        offset, chunks = cls._HEADER.size, []
        for i in range(count):
            if offset + 8 > len(data):
                raise InvalidCiphertextError(f"encrypted update is truncated at chunk {i} of {count}")
            (size,) = struct.unpack_from("<Q", data, offset)
            offset += 8
            if offset + size > len(data):
                raise InvalidCiphertextError(f"encrypted update is truncated at chunk {i} of {count}")
            chunks.append(data[offset : offset + size])
            offset += size
        if offset != len(data):
            raise InvalidCiphertextError(f"encrypted update has {len(data) - offset} trailing bytes")
        return cls(tuple(chunks), length, weight)


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only, through the store's safe-write path: a unique temp created
    0600 with O_NOFOLLOW, fsynced, renamed over ``path`` (never a moment with a wider mode or a torn file)."""
    atomic_write(path, data, root=path.parent, perms=0o600)


def generate_keys(params: CkksParams, client_dir: Path, server_dir: Path, *, overwrite: bool = False) -> KeyPaths:
    """Create the clients' secret context under ``client_dir`` (mode 0600) and the server's public one.

    The two folders must be disjoint so that nothing the server is pointed at can hold the secret.
    The public context carries only the parameters: no secret, public, relinearisation or Galois keys,
    because the server only adds ciphertexts.
    """
    client_dir, server_dir = Path(client_dir).resolve(), Path(server_dir).resolve()
    if client_dir.is_relative_to(server_dir) or server_dir.is_relative_to(client_dir):
        raise ValueError(f"client_dir={client_dir} and server_dir={server_dir} must be disjoint folders")
    secret_path, public_path = client_dir / SECRET_FILE, server_dir / PUBLIC_FILE
    if not overwrite and (secret_path.exists() or public_path.exists()):
        raise FileExistsError(f"CKKS keys exist at {secret_path} or {public_path}; pass overwrite=True")
    client_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    server_dir.mkdir(parents=True, exist_ok=True)

    ctx = params.make_context()
    secret = ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    public = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    _write_private(secret_path, secret)
    atomic_write(public_path, public, root=public_path.parent)
    for path, blob in ((secret_path, secret), (public_path, public)):
        atomic_write(path.with_name(path.name + ".sha256"), _sha256(blob) + "\n", root=path.parent)
    return KeyPaths(secret_path, public_path, _sha256(secret), _sha256(public))


def _read_context(path: Path, expected_sha256: str | None) -> ts.Context:
    data = Path(path).read_bytes()
    if expected_sha256 is not None and _sha256(data) != expected_sha256:
        raise ValueError(f"{path} has SHA-256 {_sha256(data)}, expected {expected_sha256}")
    try:
        return ts.context_from(data)
    except (ValueError, RuntimeError, TypeError) as err:
        raise ValueError(f"{path} is not a TenSEAL context: {err}") from err


def load_public_context(path: Path, expected_sha256: str | None = None) -> ts.Context:
    """Server side: load the public context, refusing one that holds a secret key."""
    ctx = _read_context(path, expected_sha256)
    if ctx.is_private():
        raise ValueError(f"{path} holds a secret key; the server must be given the public context only")
    return ctx


def load_secret_context(path: Path, expected_sha256: str | None = None) -> ts.Context:
    """Client side: load the secret context, refusing one readable by group/others or without a key."""
    mode = Path(path).stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} has mode {mode:o}; a secret context must be 0600")
    ctx = _read_context(path, expected_sha256)
    if not ctx.is_private():
        raise ValueError(f"{path} holds no secret key; clients need the secret context")
    return ctx


def _slots(ctx: ts.Context) -> int:
    return ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def value_bound(ctx: ts.Context) -> float:
    """Largest |weighted sum| a slot may hold: 2 bits below the data modulus, so overflow is detectable."""
    data_bits = ctx.seal_context().data.first_context_data().total_coeff_modulus_bit_count()
    return 2.0 ** (data_bits - 2) / ctx.global_scale


def _as_flat_float64(vector: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(vector, torch.Tensor):
        vector = vector.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(vector, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"update must be a non-empty flat vector, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("update holds NaN or inf; refusing to encrypt it")
    return arr


def encrypt_update(vector: np.ndarray | torch.Tensor, weight: int, ctx: ts.Context) -> EncryptedUpdate:
    """Client side: ``weight * vector`` packed into full ciphertexts (``N/2`` values each), serialized."""
    if not _is_int(weight) or weight < 1:
        raise ValueError(f"weight={weight!r} must be an integer example count >= 1")
    if not ctx.is_private():
        raise ValueError("encrypt_update needs the clients' secret context")
    weighted = _as_flat_float64(vector) * int(weight)
    bound = value_bound(ctx)
    peak = float(np.abs(weighted).max())
    if peak > bound:
        raise ValueError(f"weight * |update| reaches {peak:.3g}, above the CKKS value bound {bound:.3g}")
    slots = _slots(ctx)
    # Full ciphertexts: every slot but the last chunk's tail carries a value, so no wire byte is wasted.
    chunks = tuple(
        ts.ckks_vector(ctx, weighted[i : i + slots].tolist()).serialize() for i in range(0, weighted.size, slots)
    )
    return EncryptedUpdate(chunks, weighted.size, int(weight))


def _load_vector(ctx: ts.Context, data: bytes, expected_size: int, where: str) -> ts.CKKSVector:
    try:
        vec = ts.ckks_vector_from(ctx, data)
    except (ValueError, RuntimeError, TypeError) as err:
        raise InvalidCiphertextError(f"{where} is not a ciphertext for this context: {err}") from err
    if vec.size() != expected_size:
        raise InvalidCiphertextError(f"{where} packs {vec.size()} values, expected {expected_size}")
    return vec


def _chunk_sizes(length: int, slots: int) -> list[int]:
    return [min(slots, length - start) for start in range(0, length, slots)]


def _check_shape(update: EncryptedUpdate, length: int, slots: int, where: str) -> list[int]:
    sizes = _chunk_sizes(update.length, slots)
    if update.length != length or len(update.chunks) != len(sizes):
        raise InvalidCiphertextError(
            f"{where} has {update.length} values in {len(update.chunks)} chunks, expected {length} in "
            f"{len(_chunk_sizes(length, slots))}"
        )
    return sizes


def check_upload(update: EncryptedUpdate | bytes, public_ctx: ts.Context, length: int) -> EncryptedUpdate:
    """Server side, one upload at a time: parse it and load every chunk as a ciphertext of this context holding
    ``length`` values at the context's scale, so that one malformed upload is refused on its own instead of failing
    the whole sum (InvalidCiphertextError). Reads no key: the server's context has none."""
    parsed = update if isinstance(update, EncryptedUpdate) else EncryptedUpdate.from_bytes(update)
    sizes = _check_shape(parsed, length, _slots(public_ctx), "upload")
    for i, (chunk, size) in enumerate(zip(parsed.chunks, sizes, strict=True)):
        vec = _load_vector(public_ctx, chunk, size, f"upload chunk {i}")
        scales = [c.scale for c in vec.ciphertext()]
        if not np.allclose(scales, public_ctx.global_scale, rtol=1e-9):
            raise InvalidCiphertextError(f"upload chunk {i} has scale {scales[0]:.6g}, not the context's")
    return parsed


def aggregate(updates: Sequence[EncryptedUpdate | bytes], public_ctx: ts.Context | Path) -> EncryptedUpdate:
    """Server side: add the clients' ciphertexts and their weights. Needs and accepts no secret key.

    ``public_ctx`` is a public context or the path of one; a context holding a secret key is refused,
    so this path cannot decrypt even when handed the wrong object.
    """
    if isinstance(public_ctx, str | os.PathLike):
        public_ctx = load_public_context(Path(public_ctx))
    if not isinstance(public_ctx, ts.Context):
        raise TypeError(f"public_ctx must be a tenseal Context or a path, got {type(public_ctx).__name__}")
    if public_ctx.is_private():
        raise ValueError("aggregate() was given a context holding a secret key; pass the public context only")
    parsed = [u if isinstance(u, EncryptedUpdate) else EncryptedUpdate.from_bytes(u) for u in updates]
    if not parsed:
        raise ValueError("aggregate() needs at least one update")
    weight = sum(int(u.weight) for u in parsed)
    if weight >= 2**64:  # the header's 64-bit field: refused here, not a struct.error when the sum is sent
        raise InvalidCiphertextError(f"the updates' weights sum to {weight}, beyond the 64-bit weight field")
    slots, length = _slots(public_ctx), parsed[0].length
    sizes = [_check_shape(u, length, slots, f"update {j}") for j, u in enumerate(parsed)][0]
    summed = []
    # Chunk-major order keeps one chunk per client in memory instead of every client's whole update.
    for i, size in enumerate(sizes):
        acc = _load_vector(public_ctx, parsed[0].chunks[i], size, f"update 0 chunk {i}")
        for j, update in enumerate(parsed[1:], start=1):
            vec = _load_vector(public_ctx, update.chunks[i], size, f"update {j} chunk {i}")
            try:
                acc += vec
            except (ValueError, RuntimeError) as err:  # e.g. a scale that differs from the others'
                raise InvalidCiphertextError(f"update {j} chunk {i} cannot be added: {err}") from err
        summed.append(acc.serialize())
    return EncryptedUpdate(tuple(summed), length, weight)


def decrypt_aggregate(agg: EncryptedUpdate | bytes, secret_ctx: ts.Context) -> np.ndarray:
    """Client side: decrypt the summed update and divide by the total weight (the FedAvg mean)."""
    if not secret_ctx.is_private():
        raise ValueError("decrypt_aggregate needs the clients' secret context")
    agg = agg if isinstance(agg, EncryptedUpdate) else EncryptedUpdate.from_bytes(agg)
    sizes = _check_shape(agg, agg.length, _slots(secret_ctx), "aggregate")
    parts = [
        np.asarray(_load_vector(secret_ctx, c, s, f"aggregate chunk {i}").decrypt(), dtype=np.float64)
        for i, (c, s) in enumerate(zip(agg.chunks, sizes, strict=True))
    ]
    total = np.concatenate(parts)
    # A sum past the bound wraps modulo q into garbage near +-q/2; refuse rather than return it (an invalid
    # aggregate, so a client answers it as it answers a malformed one).
    if np.abs(total).max() > value_bound(secret_ctx):
        raise InvalidCiphertextError("decrypted aggregate exceeds the CKKS value bound: the weighted sum overflowed")
    return total / agg.weight


def self_test(
    secret_ctx: ts.Context, public_ctx: ts.Context, *, n_values: int, clients: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Measure these keys on a model-sized FedAvg: error against the plaintext mean, and whether the
    server's context can decrypt (it must not). Weights are all 1, the worst case for the error."""
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0.0, 0.05, n_values) for _ in range(clients)]
    wire = [encrypt_update(u, 1, secret_ctx).to_bytes() for u in updates]
    agg = aggregate(wire, public_ctx)
    error = float(np.abs(decrypt_aggregate(agg, secret_ctx) - np.mean(updates, axis=0)).max())
    try:
        ts.ckks_vector_from(public_ctx, agg.chunks[0]).decrypt()
        public_decrypts = True
    except ValueError:
        public_decrypts = False
    return {
        "max_abs_error": error,
        "n_values": n_values,
        "clients": clients,
        "bytes_per_param": float(np.mean([len(w) for w in wire])) / n_values,
        "public_context_decrypts": public_decrypts,
    }

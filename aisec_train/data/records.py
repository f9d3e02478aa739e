"""Record identity: a 16-byte digest of each record's content, whatever file, order, container or dtype held it.

The privacy budget is charged to records (aisec_train/privacy/record_sets.py), so two copies of the same image and
label must give the same digest. A record's canonical form, hashed with BLAKE2b-128:

- pixels as decoded, laid out (C, H, W) C-contiguous (every source already yields that layout: NHWC arrays are
  transposed on read, image files are decoded to RGB);
- **quantised**: when every pixel ``v`` of the record (float, scale [0, 1]) lies within ``GRID_TOL`` of a multiple
  of 1/255, the record is its ``uint8`` values ``round(255 v)``; uint8 sources are already that. Otherwise the
  record is its float32 values (what training reads), with ``-0.0`` folded into ``0.0``. So ``uint8`` pixels,
  their ``x / 255`` in float32 or float64, and any lossless cast between them give one digest; a float64 value
  that float32 cannot hold is identified by the float32 value training sees;
- a float record off that grid whose pixels are all whole numbers in 0..255 (uint8 values cast to float without the
  1/255 scale, which the npz loader accepts with a value-range finding) is those ``uint8`` values too: otherwise
  ``x.astype(float32)`` of a spent dataset would be fresh records (a record whose pixels are all 0 or 1 is on
  the grid already and reads as 0 and 255);
- a grey image stored as RGB (three equal channels, as an ImageFolder PNG export of grey images decodes) is its
  one-channel form;
- the label as a signed 64-bit integer (int32 or int64 labels are the same record).

What identity cannot catch (docs/privacy.md): a resized, cropped, re-encoded (lossy JPEG) or augmented copy has
other pixel values and is another record; so is the same image under another label.

    >>> digests = digest_arrays(x, y)          # one np.void(16) per row, in row order
    >>> keep = first_occurrences(digests)       # indices of the first copy of each record
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from aisec_train.data.errors import DataError
from aisec_train.hashing import sha256_bytes

if TYPE_CHECKING:  # torch is imported by the caller that streams tensors; hashing arrays does not need it
    import torch

DIGEST = np.dtype("V16")
GRID_TOL = 1e-3  # in units of 1/255: float32 holds k/255 to within ~2e-5 of them, genuine float data is far off
CHUNK_VALUES = 1 << 21  # pixel values converted at once (a float64 copy of a chunk stays at 16 MiB)


HEADER = np.dtype([("kind", "S1"), ("label", "<i8"), ("c", "<u4"), ("h", "<u4"), ("w", "<u4")])  # 21 bytes


def _digests(kind: bytes, labels: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """BLAKE2b-128 of ``header + pixel bytes`` per record of an (n, C, H, W) block of one kind: the rows are laid
    out side by side first, so Python only calls the hash (three times faster than packing each header)."""
    header = np.zeros(len(pixels), dtype=HEADER)
    header["kind"], header["label"] = kind, labels
    header["c"], header["h"], header["w"] = pixels.shape[1:]
    rows = np.concatenate(
        [header.view(np.uint8).reshape(len(pixels), -1), pixels.reshape(len(pixels), -1).view(np.uint8)], axis=1
    )
    blake = hashlib.blake2b
    return np.frombuffer(b"".join([blake(row, digest_size=16).digest() for row in rows]), dtype=DIGEST)


def _grey(block: np.ndarray) -> np.ndarray:
    """Per record of an (N, C, H, W) block: True where C == 3 and the three channels are equal."""
    if block.shape[1] != 3:
        return np.zeros(len(block), dtype=bool)
    flat = block.reshape(len(block), 3, -1)
    return ((flat[:, 0] == flat[:, 1]) & (flat[:, 1] == flat[:, 2])).all(axis=1)


def _canonical_rows(block: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Digests of an (N, C, H, W) block (uint8 or float) with its labels, in order."""
    if block.dtype == np.uint8:
        on_grid, q = np.ones(len(block), dtype=bool), block
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf are never on the grid (sanity refuses them)
            x32 = block.astype(np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
            scaled = x32.astype(np.float64) * 255.0
            q64 = np.rint(scaled)
            axes = tuple(range(1, block.ndim))
            on_grid = (np.abs(scaled - q64) <= GRID_TOL).all(axis=axes) & (q64 >= 0).all(axis=axes)
            on_grid &= (q64 <= 255).all(axis=axes)
            # uint8 values cast to float unscaled: whole numbers 0..255 off the 1/255 grid (some pixel above 1)
            whole = x32.astype(np.float64)
            unscaled = ~on_grid & (whole == np.rint(whole)).all(axis=axes) & (whole >= 0).all(axis=axes)
            unscaled &= (whole <= 255).all(axis=axes)
            q64 = np.where(unscaled.reshape(-1, *[1] * (block.ndim - 1)), whole, q64)
            on_grid |= unscaled
            q = np.where(on_grid.reshape(-1, *[1] * (block.ndim - 1)), q64, 0).astype(np.uint8)
        block = x32
    out = np.empty(len(block), dtype=DIGEST)
    grey = _grey(q) & on_grid | (_grey(block) & ~on_grid if block.dtype != np.uint8 else False)
    for kind, values, chosen in ((b"u", q, on_grid), (b"f", block, ~on_grid)):
        for is_grey in (False, True):
            rows = np.flatnonzero(chosen & (grey == is_grey))
            if len(rows):
                pixels = values[rows, :1] if is_grey else values[rows]
                out[rows] = _digests(kind, labels[rows], np.ascontiguousarray(pixels))
    return out


def digest_arrays(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Record digests of an (N, C, H, W) array (uint8 0-255 or float 0-1) and its labels, in row order."""
    out = np.empty(len(x), dtype=DIGEST)
    labels = np.asarray(y).astype(np.int64)
    rows = max(1, CHUNK_VALUES // max(1, int(np.prod(x.shape[1:]))))
    for start in range(0, len(x), rows):
        stop = min(start + rows, len(x))
        out[start:stop] = _canonical_rows(np.asarray(x[start:stop]), labels[start:stop])
    return out


def digest_batch(images: torch.Tensor, labels: torch.Tensor | list[int]) -> bytes:
    """Concatenated digests of a batch of float (C, H, W) tensors, as a loader yields them (streamed sources)."""
    import torch

    labels = np.asarray(torch.as_tensor(labels)).astype(np.int64)
    return _canonical_rows(images.detach().cpu().numpy(), labels).tobytes()


def hash_image_file(path: Path, label: int) -> tuple[str, bytes]:
    """One read of an image file: its SHA-256 (for the manifest) and its record digest (decoded pixels)."""
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path} is not a readable image: {err}") from err
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))[None]
    return sha256_bytes(raw), _canonical_rows(chw, np.asarray([label], dtype=np.int64)).tobytes()


def first_occurrences(digests: np.ndarray) -> np.ndarray:
    """Sorted indices of the first copy of every distinct record (later exact copies left out)."""
    if len(digests) == 0:
        return np.empty(0, dtype=np.int64)
    order = np.argsort(np.ascontiguousarray(digests, dtype=DIGEST).view("S16"), kind="stable")
    pairs = np.ascontiguousarray(digests, dtype=DIGEST)[order].view("<u8").reshape(-1, 2)
    first = np.ones(len(order), dtype=bool)  # stable sort: the first of equal digests has the lowest index
    first[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    return np.sort(order[first])


def source_digests(train: object) -> tuple[np.ndarray | None, dict[Path, str]]:
    """Record digests of a source's training set read where it already is: an in-memory array's rows (no second
    read), an image folder's files (each file read once, for its manifest hash and its decoded pixels). ``None``
    for any other dataset: its digests are taken while the manifest streams its items (``manifest.sha256_items``).
    Returns the digests and the manifest hashes of the files read here."""
    from aisec_train.data.arrays import ArrayDataset

    if isinstance(train, ArrayDataset):
        return digest_arrays(train.x, train.labels), {}
    own = getattr(train, "digests", None)  # a dataset that names its own records (data/text.py: normalised text)
    if callable(own):
        named = list(own())
        if len(named) == len(train) and all(isinstance(d, bytes) and len(d) == 16 for d in named):  # type: ignore[arg-type]
            return np.frombuffer(b"".join(named), dtype=DIGEST), {}
    samples = getattr(train, "samples", None)
    if getattr(train, "is_image_folder", False) and samples is not None:
        hashed, digests = {}, bytearray()
        for path, label in samples:
            hashed[Path(path)], digest = hash_image_file(Path(path), label)
            digests += digest
        return np.frombuffer(bytes(digests), dtype=DIGEST), hashed
    return None, {}

"""Where data comes from. Each source returns :class:`SourceData` (map-style datasets); nothing is downloaded.

A source only reads: hashing (manifest.py), splitting, augmentation and checks happen once, in
:mod:`aisec_train.data.dataset`. Register your own with ``@register_source("name", keys=(...))``; ``keys`` are the
``dataset.*`` keys it reads, and any other source-specific key set on the command line is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np

from aisec_train.data.arrays import ArrayDataset
from aisec_train.data.config import DatasetConfig
from aisec_train.data.errors import DataError
from aisec_train.data.source_data import SourceData
from aisec_train.errors import ConfigError

__all__ = ["SOURCES", "SourceData", "DataError", "NPZ_READ_ERRORS", "register_source", "check_source_keys"]

# What numpy and zipfile raise on a damaged or hostile .npz (tokenize.TokenError: numpy tokenizes an .npy header
# before literal_eval, and a damaged header raises it). Every reader of a user's .npz refuses these in one line.
NPZ_READ_ERRORS = (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError, TypeError, SyntaxError, TokenError)


Source = Callable[[DatasetConfig, int], SourceData]
SOURCES: dict[str, Source] = {}
SOURCE_KEYS: dict[str, tuple[str, ...]] = {}
# Keys only some sources read; a value other than the default for a source that ignores it is refused.
SPECIFIC_KEYS = ("path", "test_path", "root", "train", "test", "resize", "n_samples", "image_size", "channels",
                 "num_classes", "test_fraction", "max_length", "tokenizer", "channels_last")  # fmt: skip


def register_source(name: str, keys: tuple[str, ...] = ()) -> Callable[[Source], Source]:
    def add(fn: Source) -> Source:
        SOURCES[name], SOURCE_KEYS[name] = fn, keys
        return fn

    return add


def check_source_keys(cfg: DatasetConfig) -> None:
    """Refuse an unknown source, and any source-specific key given for a source that does not read it."""
    if cfg.name not in SOURCES:
        raise ConfigError(f"dataset.name={cfg.name!r} is not allowed: choose one of {', '.join(sorted(SOURCES))}")
    default = DatasetConfig()
    for key in SPECIFIC_KEYS:
        value = getattr(cfg, key)
        if key not in SOURCE_KEYS[cfg.name] and value != getattr(default, key):
            users = sorted(name for name, keys in SOURCE_KEYS.items() if key in keys)
            raise ConfigError(
                f"dataset.{key}={value!r} is not allowed with dataset={cfg.name}: only {', '.join(users)} read it"
            )


@register_source("digits", keys=("test_fraction",))
def digits(cfg: DatasetConfig, seed: int) -> SourceData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    return SourceData(ArrayDataset(x, y), source="sklearn.datasets.load_digits (bundled)", arrays={"x": x, "y": y})


@register_source("synthetic", keys=("n_samples", "image_size", "channels", "num_classes", "test_fraction"))
def synthetic(cfg: DatasetConfig, seed: int) -> SourceData:
    rng = np.random.default_rng(seed)
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    prototypes = rng.uniform(0.0, 1.0, size=(k, c, s, s)) > 0.6
    y = np.arange(cfg.n_samples) % k
    rng.shuffle(y)
    x = np.clip(0.7 * prototypes[y] + rng.normal(0.0, 0.15, size=(cfg.n_samples, c, s, s)), 0, 1).astype(np.float32)
    return SourceData(
        ArrayDataset(x, y, channels_last=False),
        source=f"synthetic(seed={seed})",
        arrays={"x": x, "y": y.astype(np.int64)},
    )


def _declared_npy(archive: zipfile.ZipFile, member: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy member declares in its header, read without reading its data."""
    with archive.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    if dtype.hasobject:
        raise DataError(f"{path}:{member} holds Python objects; only numeric arrays are read (no pickles)")
    return shape, dtype


def read_npz(path: Path, key: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``x``, ``y`` and the SHA-256 of an .npz, refusing before any array is read when the headers declare more than
    ``max_bytes``. One open file: the hash the manifest records and the arrays trained on come from the same file
    (hashed again by path afterwards, a file renamed into place between the two was trained on under the first's
    hash, and passed a ``dataset.sha256`` pin)."""
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r} does not exist or is not a file")
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            missing = {"x", "y"} - set(members)
            if missing:
                raise DataError(f"{key}={str(path)!r} lacks array(s) {sorted(missing)}; it must hold 'x' and 'y'")
            declared = 0
            for name in ("x", "y"):
                shape, dtype = _declared_npy(archive, members[name], path)
                declared += int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > max_bytes:
                raise DataError(
                    f"{key}={str(path)!r} declares {declared} bytes of arrays, over dataset.max_bytes={max_bytes}; "
                    "raise dataset.max_bytes if this machine can hold them"
                )
            fh.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            fh.seek(0)
            # allow_pickle=False: an .npz holding object arrays could run code when loaded.
            with np.load(fh, allow_pickle=False) as loaded:
                return np.asarray(loaded["x"]), np.asarray(loaded["y"]), digest.hexdigest()
    except DataError:
        raise
    except NPZ_READ_ERRORS as err:
        raise DataError(f"{key}={str(path)!r} is not a readable .npz of numeric arrays: {err}") from err


@register_source("npz", keys=("path", "test_path", "test_fraction", "channels_last"))
def npz(cfg: DatasetConfig, seed: int) -> SourceData:
    if not cfg.path:
        raise DataError("dataset.path=None is not allowed: dataset=npz needs a .npz file path")
    train_path = Path(cfg.path)
    x, y, digest = read_npz(train_path, "dataset.path", cfg.max_bytes)
    layout = {"channels_last": cfg.channels_last, "setting": "dataset.channels_last"}
    data = SourceData(ArrayDataset(x, y, "x", **layout), source=f"npz:{train_path.name}", files=[train_path])
    data.hashed[train_path] = digest
    if cfg.test_path:
        test_path = Path(cfg.test_path)
        xt, yt, test_digest = read_npz(test_path, "dataset.test_path", cfg.max_bytes)
        data.test = ArrayDataset(xt, yt, "x_test", **layout)
        data.files.append(test_path)
        data.hashed[test_path] = test_digest
    return data


def _require_root(cfg: DatasetConfig, expected: Path) -> Path:
    if not cfg.root:
        raise DataError(f"dataset.root=None is not allowed: dataset={cfg.name} needs an existing folder")
    if not expected.is_dir():
        raise DataError(
            f"dataset.root={cfg.root!r} has no {expected.relative_to(cfg.root)}/; "
            "aisec-train never downloads: place the torchvision-style files there first"
        )
    return expected


def _read_idx(folder: Path, stem: str) -> tuple[np.ndarray, Path]:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            opener: Any = gzip.open if path.suffix == ".gz" else open
            try:
                with opener(path, "rb") as fh:
                    data = fh.read()
            # a truncated, corrupt or mislabelled .gz: gzip raises EOFError, BadGzipFile (an OSError) or zlib.error
            except (OSError, EOFError, zlib.error) as err:
                raise DataError(f"{path} cannot be read: {' '.join(str(err).split())[:160]}") from None
            # magic: two zero bytes, the type code (0x08: unsigned bytes, the only type MNIST files hold), the rank
            if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or not 1 <= data[3] <= 4:
                raise DataError(
                    f"{path} is not a valid idx file of unsigned bytes: its magic is {data[:4].hex() or 'empty'}, "
                    "expected 000008 then a rank of 1 to 4"
                )
            ndim = data[3]
            offset = 4 + 4 * ndim
            shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            if len(data) < offset or len(data) - offset != int(np.prod(shape, dtype=object)):
                raise DataError(
                    f"{path} is not a valid idx file: its header declares {shape}, {len(data) - offset} data bytes "
                    "follow"
                )
            return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape), path
    raise DataError(f"{folder / stem}[.gz] is missing")


def _idx_source(folder_name: str) -> Source:
    def read(cfg: DatasetConfig, seed: int) -> SourceData:
        raw = _require_root(cfg, Path(cfg.root or "") / folder_name / "raw")
        stems = (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
        (xtr, f1), (ytr, f2), (xte, f3), (yte, f4) = [_read_idx(raw, s) for s in stems]
        return SourceData(
            ArrayDataset(xtr, ytr.astype(np.int64)),
            ArrayDataset(xte, yte.astype(np.int64), "x_test"),
            f"{folder_name} idx files",
            [f1, f2, f3, f4],
            root=Path(cfg.root or ""),
        )

    return read


register_source("mnist", keys=("root",))(_idx_source("MNIST"))
register_source("fashion_mnist", keys=("root",))(_idx_source("FashionMNIST"))


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles: allow only the numpy array reconstruction they need."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


@register_source("cifar10", keys=("root",))
def cifar10(cfg: DatasetConfig, seed: int) -> SourceData:
    folder = _require_root(cfg, Path(cfg.root or "") / "cifar-10-batches-py")

    def batch(name: str) -> tuple[np.ndarray, np.ndarray, Path]:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing")
        try:
            with open(path, "rb") as fh:
                entry = _ArraysOnlyUnpickler(fh, encoding="bytes").load()
            data, labels = np.asarray(entry[b"data"]), np.asarray(entry[b"labels"])
            # CIFAR-10 holds uint8 pixels and int labels: a cast would turn float pixels into 0 and 0.5 into class 0
            if data.dtype != np.uint8:
                raise DataError(f"{path} is not a CIFAR-10 batch: its data is {data.dtype}, expected uint8 pixels")
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
                raise DataError(
                    f"{path} is not a CIFAR-10 batch: its labels are {labels.dtype} of shape {labels.shape}, "
                    "expected a list of int class indices"
                )
            if len(labels) and (labels.min() < 0 or labels.max() > np.iinfo(np.int64).max):
                bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
                raise DataError(f"{path} holds label {bad}; labels must be class indices 0..K-1")
            return data.reshape(-1, 3, 32, 32), labels.astype(np.int64), path
        except DataError as err:  # the unpickler's refusal does not know the file: name it
            if str(path) in str(err):
                raise
            raise DataError(f"{path} is not a CIFAR-10 batch: {err}") from None
        # OverflowError: a label too large for any integer dtype; AttributeError / IndexError from a damaged stream
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, OverflowError, AttributeError,
                IndexError, MemoryError) as err:  # fmt: skip
            raise DataError(f"{path} is not a CIFAR-10 batch: {' '.join(str(err).split())[:200]}") from None

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    xte, yte, ftest = batch("test_batch")
    return SourceData(
        ArrayDataset(np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), channels_last=False),
        ArrayDataset(xte, yte, "x_test", channels_last=False),
        "cifar-10-batches-py",
        [b[2] for b in train] + [ftest],
        root=Path(cfg.root or ""),
    )


@register_source("imagefolder", keys=("root", "resize", "test_fraction"))
def imagefolder(cfg: DatasetConfig, seed: int) -> SourceData:
    from aisec_train.data.images import read_image_folder

    return read_image_folder(cfg)


@register_source("text", keys=("path", "test_path", "test_fraction", "max_length", "tokenizer"))
def text(cfg: DatasetConfig, seed: int) -> SourceData:
    from aisec_train.data.text import read_text_source  # transformers and datasets: only text runs import them

    return read_text_source(cfg)


@register_source("custom", keys=("train", "test", "test_fraction"))
def custom(cfg: DatasetConfig, seed: int) -> SourceData:
    from aisec_train.components import instantiate_dataset
    from aisec_train.data.items import check_items

    train = instantiate_dataset(cfg.train, "dataset.train")
    if train is None:
        raise DataError("dataset.train._target_=None is not allowed: dataset=custom needs a Dataset class")
    # Every item checked as the Python API checks its datasets (data/items.py), before it is hashed or split: a
    # float64 image, a string label or a failing __getitem__ otherwise surfaced as a traceback, the float64 one
    # only at the first training step, after the privacy ledger was opened.
    check_items(train, "dataset.train", min_items=2)
    test = instantiate_dataset(cfg.test, "dataset.test")
    if test is not None:
        check_items(test, "dataset.test")
    return SourceData(train, test, source=f"custom:{cfg.train.get('_target_')}")

"""Where raw arrays come from. Each source returns :class:`RawData`; nothing is ever downloaded.

A source only reads: scaling, layout, hashing and splitting happen once, in :mod:`aisec_train.data.dataset`.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aisec_train.config import DatasetConfig


class DataError(ValueError):
    """Data that cannot be used: missing, malformed, tampered or unusable for training."""


@dataclass
class RawData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    source: str = ""
    files: list[Path] = field(default_factory=list)  # every file read, hashed into the manifest
    channels_last: bool = False  # True when x is (N, H, W, C)


SOURCES: dict[str, Callable[[DatasetConfig, int], RawData]] = {}


def register_source(name: str):
    def add(fn: Callable[[DatasetConfig, int], RawData]) -> Callable[[DatasetConfig, int], RawData]:
        SOURCES[name] = fn
        return fn

    return add


@register_source("digits")
def digits(cfg: DatasetConfig, seed: int) -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)  # pixel values are 0..16
    return RawData(x, bunch.target.astype(np.int64), source="sklearn.datasets.load_digits (bundled)")


@register_source("synthetic")
def synthetic(cfg: DatasetConfig, seed: int) -> RawData:
    rng = np.random.default_rng(seed)
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    prototypes = rng.uniform(0.0, 1.0, size=(k, c, s, s)) > 0.6
    y = np.arange(cfg.n_samples) % k
    rng.shuffle(y)
    x = 0.7 * prototypes[y] + rng.normal(0.0, 0.15, size=(cfg.n_samples, c, s, s))
    return RawData(np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64), source=f"synthetic(seed={seed})")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"dataset.path={str(path)!r} does not exist or is not a file")
    try:
        # allow_pickle=False: an .npz holding object arrays could run code when loaded.
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataError(f"{path} lacks array(s) {sorted(missing)}; it must hold 'x' and 'y'")
            return archive["x"], archive["y"]
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable .npz of numeric arrays: {err}") from err


@register_source("npz")
def npz(cfg: DatasetConfig, seed: int) -> RawData:
    train_path = Path(cfg.path or "")
    x, y = _read_npz(train_path)
    raw = RawData(x, y, source=f"npz:{train_path.name}", files=[train_path])
    if cfg.test_path:
        test_path = Path(cfg.test_path)
        raw.x_test, raw.y_test = _read_npz(test_path)
        raw.files.append(test_path)
    return raw


def _require_root(cfg: DatasetConfig, expected: Path) -> Path:
    if not cfg.root:
        raise DataError(f"dataset={cfg.name.value} needs dataset.root, an existing torchvision-style folder")
    if not expected.is_dir():
        raise DataError(
            f"dataset.root={cfg.root!r} has no {expected.relative_to(cfg.root)}/; "
            "aisec-train never downloads: place the torchvision-style files there first"
        )
    return expected


def _read_idx(folder: Path, stem: str) -> tuple[np.ndarray, Path]:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as fh:
                data = fh.read()
            ndim = data[3]
            shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape), path
    raise DataError(f"{folder / stem}[.gz] is missing")


def _idx_source(folder_name: str) -> Callable[[DatasetConfig, int], RawData]:
    def read(cfg: DatasetConfig, seed: int) -> RawData:
        raw_dir = _require_root(cfg, Path(cfg.root or "") / folder_name / "raw")
        parts = [_read_idx(raw_dir, s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")]
        parts += [_read_idx(raw_dir, s) for s in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
        (xtr, f1), (ytr, f2), (xte, f3), (yte, f4) = parts
        return RawData(
            xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), f"{folder_name} idx files", [f1, f2, f3, f4]
        )

    return read


register_source("mnist")(_idx_source("MNIST"))
register_source("fashion_mnist")(_idx_source("FashionMNIST"))


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


@register_source("cifar10")
def cifar10(cfg: DatasetConfig, seed: int) -> RawData:
    folder = _require_root(cfg, Path(cfg.root or "") / "cifar-10-batches-py")

    def batch(name: str) -> tuple[np.ndarray, np.ndarray, Path]:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing")
        with open(path, "rb") as fh:
            entry = _ArraysOnlyUnpickler(fh, encoding="bytes").load()
        x = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(entry[b"labels"], dtype=np.int64), path

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    xte, yte, ftest = batch("test_batch")
    return RawData(
        np.concatenate([b[0] for b in train]),
        np.concatenate([b[1] for b in train]),
        xte,
        yte,
        "cifar-10-batches-py",
        [b[2] for b in train] + [ftest],
    )

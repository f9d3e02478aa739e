"""``dataset=imagefolder dataset.root=DIR``: torchvision's ``ImageFolder`` layout, read lazily, one file per item.

``DIR/train/<class>/*.png`` and ``DIR/test/<class>/*.png`` give both splits (the class folders must match);
``DIR/<class>/*.png`` alone gives one set that is split by ``dataset.test_fraction``. Images are decoded by
PIL (RGB, as ``ImageFolder``'s own loader does), scaled to float32 in [0, 1] and optionally resized
(``dataset.resize``); without a resize every image must have the size of the first one, and an odd one is
refused naming its file, whenever it is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import has_file_allowed_extension
from torchvision.transforms import v2

from aisec_train.data.config import DatasetConfig
from aisec_train.data.errors import DataError
from aisec_train.data.source_data import SourceData


def decode_rgb(path: str) -> torch.Tensor:
    """ImageFolder's PIL loader (``convert("RGB")``) straight to a contiguous float32 (C, H, W) in [0, 1]: the same
    values as its ``ToImage`` + ``ToDtype(scale=True)`` without two v2 transform dispatches per image (on small
    images that dispatch was a third of the streamed path's cost), without ``convert``'s copy of an image that is
    already RGB, and laid out (C, H, W) in memory so augmentation and collation read it without striding.
    (torchvision.io's decoder is faster still, but deprecated since torchvision 0.29.)"""
    with Image.open(path) as image:
        pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    return (
        torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).mul_(1 / 255)
    )


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)  # follows links: two paths of one real folder have one identity
    return st.st_dev, st.st_ino


def walk_once(
    top: str, seen: set[tuple[int, int]], blocked: frozenset[tuple[int, int]] = frozenset()
) -> Iterator[tuple[str, list[str]]]:
    """``(folder, sorted file names)`` under ``top``, following directory symlinks but entering each real folder
    once (``seen``, shared between calls) and never a ``blocked`` one (the tree's root, its ancestors and the other
    class folders): a symlink loop ends, and a folder reached by two paths is not read twice. Sorted at every level,
    so which path of a folder is kept does not depend on the file system's listing order."""
    for root, dirs, files in os.walk(top, followlinks=True):
        if _identity(root) in seen:
            dirs[:] = []
            continue
        seen.add(_identity(root))
        dirs[:] = sorted(d for d in dirs if _identity(os.path.join(root, d)) not in seen | blocked)
        yield root, sorted(files)


def _blocked(directory: str, classes: list[str]) -> frozenset[tuple[int, int]]:
    real = Path(os.path.realpath(directory))
    return frozenset(_identity(str(p)) for p in [real, *real.parents, *(real / c for c in classes)])


class CheckedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` returning float (C, H, W) in [0, 1] of one fixed size, with ``labels`` for cheap access.
    Folders are walked by :func:`walk_once` (torchvision's own walk follows a symlink loop until the path is too
    long, multiplying every image in it)."""

    is_image_folder = True  # data/records.py reads its files once, for the manifest and the record digests

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        valid = is_valid_file or (lambda p: has_file_allowed_extension(p, extensions))
        samples, seen = [], set()  # one tree: a folder linked from two classes is read for the first only
        blocked = _blocked(directory, list(class_to_idx))
        for name in sorted(class_to_idx):
            for root, files in walk_once(os.path.join(directory, name), seen, blocked):
                found = [os.path.join(root, f) for f in files if valid(os.path.join(root, f))]
                for path in found:  # x.png -> /dev/zero was read until memory ran out; a FIFO blocked forever
                    if not os.path.isfile(path):
                        raise DataError(
                            f"{path} is not a regular file (a device, FIFO, socket or dangling link); an image "
                            "folder holds image files only"
                        )
                samples += [(path, class_to_idx[name]) for path in found]
        empty = set(class_to_idx) - {Path(p).relative_to(directory).parts[0] for p, _ in samples}
        if empty and not allow_empty:
            raise FileNotFoundError(f"found no image file for the classes {', '.join(sorted(empty))}")
        return samples

    def __init__(self, root: Path, size: tuple[int, int] | None):
        resize = v2.Resize(list(size), antialias=True) if size is not None else None
        try:
            super().__init__(str(root), transform=resize, loader=decode_rgb)
        except (FileNotFoundError, OSError) as err:
            raise DataError(f"dataset.root: {root} is not an ImageFolder tree of class folders: {err}") from err
        self.labels = list(self.targets)
        self.expected: tuple[int, ...] | None = None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.samples[index][0]
        try:
            image, label = super().__getitem__(index)
        # PIL's errors for unreadable or truncated files, and for a decompression bomb (its own Exception type)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"{path} is not a readable image: {err}") from err
        if self.expected is None:
            self.expected = tuple(image.shape)
        elif tuple(image.shape) != self.expected:
            raise DataError(
                f"{path} is {tuple(image.shape)} (C, H, W) but the folder's images are {self.expected}; "
                "set dataset.resize=[H,W] to resize every image"
            )
        return image, label

    @property
    def files(self) -> list[Path]:
        return [Path(p) for p, _ in self.samples]


def read_image_folder(cfg: DatasetConfig) -> SourceData:
    if not cfg.root:
        raise DataError("dataset.root=None is not allowed: dataset=imagefolder needs an existing folder")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"dataset.root={cfg.root!r} does not exist or is not a folder")
    size = None if cfg.resize is None else (cfg.resize[0], cfg.resize[-1])
    split = (root / "train").is_dir() and (root / "test").is_dir()
    for half, other in (("train", "test"), ("test", "train")):
        # DIR/train/<class>/ alone was read as one class named "train" (then refused as a single class)
        if (root / half).is_dir() and not (root / other).is_dir() and any(p.is_dir() for p in (root / half).iterdir()):
            raise DataError(
                f"dataset.root={cfg.root!r} has {half}/ with class folders but no {other}/: give both "
                f"{root}/train/<class>/ and {root}/test/<class>/, or the class folders directly in {root}/"
            )
    train = CheckedImageFolder(root / "train" if split else root, size)
    test = CheckedImageFolder(root / "test", size) if split else None
    if test is not None and test.classes != train.classes:
        raise DataError(
            f"dataset.root={cfg.root!r}: test/ has classes {test.classes}, train/ has {train.classes}; they must match"
        )
    first, _ = train[0]  # fixes the expected size for every later item (and refuses an unreadable first file)
    if test is not None:
        test.expected = tuple(first.shape)
    files = train.files + (test.files if test is not None else [])
    return SourceData(train, test, source=f"imagefolder:{root.name}", files=files, root=root)

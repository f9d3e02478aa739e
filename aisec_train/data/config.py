"""The schema of the ``dataset`` group: where the data comes from, how it is transformed and checked.

One flat dataclass serves every source; :data:`aisec_train.data.sources.SOURCE_KEYS` says which keys each
source reads, and a key set for another source is refused (``dataset=digits dataset.root=DIR``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from aisec_train.errors import require

GIB = 1 << 30
MAX_RESIZE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: what PIL itself treats as a decompression bomb


@dataclass
class AugmentConfig:
    """Training-time augmentation (torchvision transforms v2 on [0, 1] tensors); evaluation never augments."""

    random_crop_padding: int = 0  # > 0: RandomCrop(image size, padding=this, padding_mode="reflect")
    horizontal_flip: bool = False

    def __post_init__(self) -> None:
        ok = self.random_crop_padding >= 0
        require(ok, "dataset.augment.random_crop_padding", self.random_crop_padding, "must be >= 0")


@dataclass
class NormalizeConfig:
    """Per-channel input normalisation, applied as the model's first layer so that attacks, triggers and radii
    all stay in [0, 1] pixel space (models/normalize.py). Both null: no normalisation."""

    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        require((self.mean is None) == (self.std is None), "dataset.normalize", self.mean, "set both mean and std")
        if self.mean is not None:  # a NaN mean turns every input into NaN (nothing else reads the values)
            ok = all(math.isfinite(m) for m in self.mean)
            require(ok, "dataset.normalize.mean", self.mean, "must be finite numbers")
        if self.std is not None:
            ok = all(math.isfinite(s) and s > 0 for s in self.std) and len(self.std) == len(self.mean or [])
            require(ok, "dataset.normalize.std", self.std, "finite values > 0, one per mean value")


@dataclass
class DatasetConfig:
    name: str = "digits"  # a registered source (aisec_train.data.sources.SOURCES)
    path: str | None = None  # npz: the training (or whole) file
    test_path: str | None = None  # npz: an optional separate test file
    # npz: x's layout; null decides from its shape (docs/data.md, "Array layout"), true: N,H,W,C, false: N,C,H,W
    channels_last: bool | None = None
    root: str | None = None  # imagefolder / mnist / fashion_mnist / cifar10: an existing folder, never downloaded
    train: Any = None  # custom: a map-style Dataset config, {_target_: pkg.Class, ...}
    test: Any = None  # custom: an optional test Dataset config; {_target_: null} = none (a stratified hold-out)
    test_fraction: float = 0.2  # stratified hold-out when no test split is given
    split_seed: int | None = None  # seed of that hold-out; null: train.seed (recorded: a resume must not change it)
    resize: list[int] | None = None  # imagefolder: [H, W] (or [S]); null: keep the stored size (must be uniform)
    sha256: str | None = None  # pin of data.manifest_sha256: a mismatch refuses to train
    outlier_z: float = 6.0  # robust z-score above which a sample is reported as an outlier
    sanity_samples: int = 50_000  # sanity checks stream over every sample up to this many, else a seeded sample
    max_bytes: int = 8 * GIB  # refuse arrays whose declared size exceeds this, before reading them
    workers: int = 0  # DataLoader worker processes (0: load in the training process)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    # synthetic: a seeded, learnable toy set for smoke tests and benchmarks
    n_samples: int = 1000
    image_size: int = 8
    channels: int = 1
    num_classes: int = 10
    # text: tokens per record, and the tokenizer's folder (configs/dataset/text.yaml fills it from model.path)
    max_length: int = 128
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        require(1 <= self.max_length <= 1_000_000, "dataset.max_length", self.max_length, "must be in [1, 1000000]")
        require(0.0 < self.test_fraction < 1.0, "dataset.test_fraction", self.test_fraction, "must be in (0, 1)")
        if self.split_seed is not None:
            ok = 0 <= self.split_seed < 2**32
            require(ok, "dataset.split_seed", self.split_seed, "must be in [0, 2**32) (numpy's seed range)")
        require(math.isfinite(self.outlier_z) and self.outlier_z > 0, "dataset.outlier_z", self.outlier_z, "> 0")
        if self.sha256 is not None:
            ok = len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256.lower())
            require(ok, "dataset.sha256", self.sha256, "must be 64 hexadecimal characters")
        if self.resize is not None:
            ok = len(self.resize) in (1, 2) and all(s >= 1 for s in self.resize)
            require(ok, "dataset.resize", self.resize, "must be [size] or [height, width] with sizes >= 1")
            # [30000, 30000] decoded the first image to 10.8 GB of float32; larger ones were killed for memory
            pixels = self.resize[0] * self.resize[-1]
            allowed = f"at most {MAX_RESIZE_PIXELS} pixels per image (PIL's decompression-bomb limit); got {pixels}"
            require(pixels <= MAX_RESIZE_PIXELS, "dataset.resize", self.resize, allowed)
        require(self.sanity_samples >= 100, "dataset.sanity_samples", self.sanity_samples, "must be >= 100")
        require(self.max_bytes >= 1, "dataset.max_bytes", self.max_bytes, "must be >= 1")
        require(self.workers >= 0, "dataset.workers", self.workers, "must be >= 0")
        require(self.n_samples >= 20, "dataset.n_samples", self.n_samples, "must be >= 20")
        require(self.num_classes >= 2, "dataset.num_classes", self.num_classes, "must be >= 2")
        require(self.image_size >= 4, "dataset.image_size", self.image_size, "must be >= 4")
        require(self.channels in (1, 3), "dataset.channels", self.channels, "must be 1 or 3")

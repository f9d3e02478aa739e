"""What every data source returns: :class:`SourceData`. Its own module, so the readers (images.py, text.py) and
the source registry that calls them (sources.py) do not import each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset


@dataclass
class SourceData:
    train: Dataset  # (float (C, H, W) in [0, 1], int label) per item, no augmentation
    test: Dataset | None = None  # None: a stratified hold-out is carved from ``train``
    source: str = ""
    files: list[Path] = field(default_factory=list)  # every file read, hashed into the manifest (streamed)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # in-memory arrays, hashed into the manifest
    root: Path | None = None  # file names in the manifest are relative to it
    hashed: dict[Path, str] = field(default_factory=dict)  # files hashed as they were read (not again by path)

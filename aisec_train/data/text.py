"""Text classification records: ``.jsonl`` / ``.csv`` files with ``text`` and ``label``, read through Hugging Face
``datasets`` from local files (nothing is downloaded), and tokenised to fixed-length id tensors.

A record's identity is its content, as for images (data/records.py): the text in NFC with runs of white space
collapsed to one space and the ends stripped, plus the label, hashed with BLAKE2b-128 (:func:`text_digest`). So
the same sentence re-exported with other line endings, indentation or Unicode composition is the same record.

Items are ``(input_ids: LongTensor (max_length,), label: int)``: the one training loop and Opacus see a tensor
batch like any other; the model wrapper (models/hf.py) derives the attention mask from the padding id.

    >>> records = read_records("train.jsonl")                   # [(text, label), ...]
    >>> dataset = TextDataset(records, tokenizer, max_length=64)
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from aisec_train.data.errors import DataError
from aisec_train.data.source_data import SourceData
from aisec_train.errors import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


def normalise(text: str) -> str:
    """The canonical form identity is computed on: NFC, white space collapsed, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_digest(text: str, label: int) -> bytes:
    """16 bytes naming the record (normalised text, label); ``b"T"`` keeps it apart from image digests."""
    header = struct.pack("<cq", b"T", int(label))
    return hashlib.blake2b(header + normalise(text).encode("utf-8"), digest_size=16).digest()


def read_records(path: str | Path, key: str = "dataset.path") -> list[tuple[str, int]]:
    """``(text, label)`` rows of a local ``.jsonl`` / ``.csv`` file; a bad file or row is refused in one line."""
    file = Path(path)
    builder = FORMATS.get(file.suffix.lower())
    if builder is None:
        raise ConfigError(f"{key}={str(path)!r} is not allowed: a .jsonl or .csv file with text and label columns")
    if not file.is_file():
        raise ConfigError(f"{key}={str(path)!r} is not allowed: no such file")
    if file.stat().st_size == 0:  # datasets' parser fails on it with an empty message
        raise DataError(f"{file} holds no records")
    from datasets import load_dataset  # noqa: PLC0415 - heavy; only text runs need it

    try:  # streamed from the local file: rows are read in order, never the whole file into an Arrow table first
        rows = load_dataset(builder, data_files=str(file), split="train", streaming=True)
        records = [_record(row, i, file) for i, row in enumerate(rows)]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets' parser errors vary by format: one line naming the file
        raise DataError(f"{file} cannot be read as {builder}: {' '.join(str(err).split())[:200]}") from None
    if not records:
        raise DataError(f"{file} holds no records")
    return records


def _record(row: dict[str, Any], index: int, file: Path) -> tuple[str, int]:
    from aisec_train.data.items import MAX_CLASSES

    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str):
        raise DataError(f"{file} row {index}: 'text' must be a string, got {type(text).__name__}")
    try:
        if isinstance(label, bool):  # JSON true / false: not a class index (int(True) would make it class 1)
            raise TypeError
        value = int(label)  # csv labels may arrive as strings
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON Infinity
        raise DataError(f"{file} row {index}: 'label' must be an integer class index, got {label!r}") from None
    if not 0 <= value < MAX_CLASSES or (isinstance(label, float) and label != value):
        # a label past MAX_CLASSES overflowed the id tensor (a traceback) before the label range check ran
        raise DataError(
            f"{file} row {index}: 'label' must be an integer class index in [0, {MAX_CLASSES}), got {label!r}"
        )
    return text, value


class TextDataset(Dataset):
    """Records tokenised once to ``max_length`` ids (truncated, padded with the tokenizer's pad id)."""

    def __init__(self, records: list[tuple[str, int]], tokenizer: Any, max_length: int = 128):
        if tokenizer.pad_token_id is None:
            raise ConfigError("model.path's tokenizer has no padding token: set one before saving it (pad_token)")
        self.records = records
        encoded = tokenizer([t for t, _ in records], truncation=True, padding="max_length", max_length=max_length,
                            return_tensors="pt")  # fmt: skip
        self.ids = encoded["input_ids"].long()
        self.labels = torch.tensor([label for _, label in records], dtype=torch.long)
        self.pad_token_id = int(tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.ids[index], int(self.labels[index])

    def digests(self) -> list[bytes]:
        return [text_digest(t, label) for t, label in self.records]


def read_text_source(cfg: Any) -> SourceData:
    """``dataset=text``: the training (and test) file tokenised by ``dataset.tokenizer``'s tokenizer (model.path's
    with ``model=hf``), as the data stage's :class:`~aisec_train.data.source_data.SourceData`. The files are hashed
    into the manifest; records are identified by :meth:`TextDataset.digests`."""
    from aisec_train.models.hf import load_tokenizer

    if not cfg.path:
        raise ConfigError("dataset.path=None is not allowed: dataset=text needs a .jsonl or .csv file")
    if not cfg.tokenizer:
        raise ConfigError(
            "dataset.tokenizer=None is not allowed: dataset=text needs a tokenizer folder "
            "(model=hf model.path=DIR, or dataset.tokenizer=DIR)"
        )
    tokenizer = load_tokenizer(cfg.tokenizer)  # never the folder's own code: trust_remote_code stays off for data
    train = TextDataset(read_records(cfg.path), tokenizer, cfg.max_length)
    data = SourceData(train, source=f"text:{Path(cfg.path).name}", files=[Path(cfg.path)])
    if cfg.test_path:
        data.test = TextDataset(read_records(cfg.test_path, "dataset.test_path"), tokenizer, cfg.max_length)
        data.files.append(Path(cfg.test_path))
    return data

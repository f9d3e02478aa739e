"""Data loading, integrity pinning and sanity checks on real and crafted arrays."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.data.errors import DataError
from aisec_train.data.sanity import check_training_split
from aisec_train.data.views import Sample, labels_of, materialize
from aisec_train.errors import ConfigError


def npz_config(path, **kw) -> DatasetConfig:
    return DatasetConfig(name="npz", path=str(path), **kw)


def check(data):
    return check_training_split(data.train, data.num_classes, 6.0)


def test_digits_is_real_bundled_data():
    data = load_dataset(DatasetConfig(), seed=0)
    x, _ = materialize(data.train)
    assert x.shape == (1437, 1, 8, 8) and len(data.test) == 360 and data.input_shape == (1, 8, 8)
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert data.num_classes == 10
    # stratified: every class in the test split, in proportion
    counts = np.bincount(labels_of(data.test))
    assert counts.min() >= 34 and counts.max() <= 38
    assert [s["step"] for s in data.lineage] == ["load", "split"]


@pytest.mark.parametrize(
    "make_x",
    [
        lambda r: (r.random((60, 6, 6)) * 255).astype(np.uint8),  # N,H,W uint8
        lambda r: r.random((60, 6, 6, 3)).astype(np.float32),  # N,H,W,C float
        lambda r: r.random((60, 3, 6, 6)).astype(np.float64),  # N,C,H,W float
    ],
)
def test_npz_layouts_become_float_nchw(tmp_path, make_x):
    rng = np.random.default_rng(0)
    x = make_x(rng)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(60) % 3)
    data = load_dataset(npz_config(tmp_path / "d.npz"), seed=0)
    channels = 3 if x.ndim == 4 else 1
    (xtr, _), (xte, _) = materialize(data.train), materialize(data.test)
    assert xtr.shape[1:] == (channels, 6, 6) and data.input_shape == (channels, 6, 6)
    assert len(data.train) + len(data.test) == 60
    assert xtr.dtype == torch.float32 and float(xtr.max()) <= 1.0
    # the same pixel values, whatever the layout: only scaling (uint8 / 255) and transposition happened
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    got = np.sort(np.concatenate([xtr.numpy().ravel(), xte.numpy().ravel()]))
    np.testing.assert_allclose(got, np.sort(x.astype(np.float32).ravel() / scale), rtol=1e-6)


def test_npz_separate_test_file(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "tr.npz", x=rng.random((40, 5, 5)), y=np.arange(40) % 2)
    np.savez(tmp_path / "te.npz", x=rng.random((10, 5, 5)), y=np.arange(10) % 2)
    data = load_dataset(npz_config(tmp_path / "tr.npz", test_path=str(tmp_path / "te.npz")), seed=0)
    assert len(data.train) == 40 and len(data.test) == 10
    assert set(data.manifest["files"]) == {"tr.npz", "te.npz"}


def test_changed_byte_is_refused_by_the_pin(tmp_path):
    rng = np.random.default_rng(2)
    x = (rng.random((50, 4, 4)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50) % 5)
    pin = load_dataset(npz_config(tmp_path / "d.npz"), seed=0).manifest_sha256
    assert load_dataset(npz_config(tmp_path / "d.npz", sha256=pin), seed=0).manifest_sha256 == pin
    x[17, 2, 3] ^= 1  # one bit of one pixel
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50) % 5)
    with pytest.raises(DataError, match="data integrity check failed"):
        load_dataset(npz_config(tmp_path / "d.npz", sha256=pin), seed=0)


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.full((20, 4, 4), np.nan, np.float32), np.arange(20) % 2, "NaN or inf"),
        (np.zeros((20, 4, 4), np.float32), np.zeros(20, np.int64), "1 class"),
        (np.zeros((20, 4), np.float32), np.arange(20) % 2, "expected \\(N,H,W\\)"),
        (np.zeros((0, 4, 4), np.float32), np.zeros(0, np.int64), "empty"),
        (np.zeros((20, 4, 4), np.float32), np.arange(19) % 2, "19"),
        (np.zeros((20, 4, 4), np.int32), np.arange(20) % 2, "dtype int32"),
        (np.zeros((20, 4, 4), np.float32), (np.arange(20) % 2).astype(np.float32), "integer array"),
        (np.zeros((20, 4, 4), np.float32), -(np.arange(20) % 2), "negative label"),
        (np.random.rand(30, 4, 4).astype(np.float32), np.arange(30) % 10, "a stratified split of 10 classes"),
    ],
)
def test_unusable_data_stops_with_a_clear_error(tmp_path, x, y, message):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(DataError, match=message):
        check(load_dataset(npz_config(tmp_path / "bad.npz"), seed=0))


def test_object_arrays_are_not_unpickled(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DataError, match="holds Python objects; only numeric arrays are read"):
        load_dataset(npz_config(tmp_path / "obj.npz"), seed=0)


def test_sanity_findings_on_crafted_data():
    data = load_dataset(DatasetConfig(), seed=0)
    x, y = materialize(data.train)
    clean = {f["check"] for f in check(data)["findings"]}
    assert clean <= {"outliers"}  # real digits: at most a couple of genuinely odd strokes
    x[5] = 1.0  # an all-white image
    x[9] = x[3]  # an exact duplicate
    x[11] = 1.7  # out of range
    keep = (y != 4) | (torch.arange(len(y)) % 10 == 0)  # class 4 mostly removed
    result = check_training_split(Sample(x[keep], y[keep]), 10, 6.0)
    assert result["coverage"] == {"mode": "all", "checked": int(keep.sum()), "of": int(keep.sum())}
    checks = {f["check"]: f for f in result["findings"]}
    assert set(checks) >= {"outliers", "exact_duplicates", "value_range", "class_balance"}
    kept_index = {int(i): n for n, i in enumerate(torch.nonzero(keep).flatten())}
    assert kept_index[5] in checks["outliers"]["indices"]
    assert kept_index[9] in checks["exact_duplicates"]["indices"]


def test_torchvision_style_roots_are_read_never_downloaded(tmp_path):
    cfg = DatasetConfig(name="mnist", root=str(tmp_path))
    with pytest.raises(DataError, match="never downloads"):
        load_dataset(cfg, seed=0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write_idx(name, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(raw / f"{name}.gz", "wb") as fh:
            fh.write(header + arr.astype(np.uint8).tobytes())

    write_idx("train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)))
    write_idx("train-labels-idx1-ubyte", np.arange(30) % 10)
    write_idx("t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    write_idx("t10k-labels-idx1-ubyte", np.arange(10))
    data = load_dataset(cfg, seed=0)
    assert data.input_shape == (1, 28, 28) and len(data.train) == 30 and len(data.test) == 10
    assert len(data.manifest["files"]) == 4


def test_cifar_batches_refuse_code_in_pickles(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)), seed=0)


def test_sanity_checks_a_seeded_sample_of_a_large_split():
    rng = np.random.default_rng(0)
    big = Sample(torch.from_numpy(rng.random((3000, 1, 4, 4), dtype=np.float32)), torch.arange(3000) % 3)
    result = check_training_split(big, 3, 6.0, max_samples=500, seed=1)
    assert result["coverage"] == {"mode": "seeded_sample", "checked": 500, "of": 3000}
    assert result["stats"]["class_counts"] == [1000, 1000, 1000]  # labels are always checked in full


def test_declared_npz_size_over_the_limit_is_refused_before_reading(tmp_path):
    np.savez(tmp_path / "big.npz", x=np.zeros((50, 32, 32), np.uint8), y=np.arange(50) % 2)
    with pytest.raises(DataError, match="declares 51600 bytes of arrays, over dataset.max_bytes=1000"):
        load_dataset(npz_config(tmp_path / "big.npz", max_bytes=1000), seed=0)


def test_keys_of_another_source_are_refused():
    from aisec_train.data.sources import check_source_keys

    with pytest.raises(ConfigError, match="dataset.root='/x' is not allowed with dataset=digits: only .*imagefolder"):
        check_source_keys(DatasetConfig(root="/x"))
    with pytest.raises(ConfigError, match="dataset.name='nope' is not allowed: choose one of"):
        check_source_keys(DatasetConfig(name="nope"))


def test_image_folder_decodes_like_pil_and_names_an_unreadable_file(tmp_path):
    """torchvision.io decodes PNG/JPEG straight to tensors; PIL (ImageFolder's own loader) covers BMP and TIFF.
    Every format must give ImageFolder's PIL RGB pixels exactly, and a corrupt file is refused by name."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

    from aisec_train.data.images import CheckedImageFolder

    rng = np.random.default_rng(0)
    pixels = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
    for cls, (mode, ext) in enumerate([("RGB", "png"), ("L", "png"), ("P", "png"), ("RGBA", "png"),
                                       ("RGB", "jpg"), ("RGB", "bmp"), ("RGB", "tiff")]):  # fmt: skip
        (tmp_path / f"c{cls}").mkdir()
        Image.fromarray(pixels).convert(mode).save(tmp_path / f"c{cls}" / f"x.{ext}")
    folder = CheckedImageFolder(tmp_path, None)
    for index, (path, _) in enumerate(folder.samples):
        expected = to_dtype(pil_to_tensor(Image.open(path).convert("RGB")), torch.float32, scale=True)
        assert torch.equal(folder[index][0], expected), path
    (tmp_path / "c0" / "y_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    folder = CheckedImageFolder(tmp_path, None)
    broken = next(i for i, (p, _) in enumerate(folder.samples) if p.endswith("y_broken.png"))
    with pytest.raises(DataError, match="y_broken.png is not a readable image"):
        folder[broken]
    # A decompression bomb (PIL refuses > 2x Image.MAX_IMAGE_PIXELS with its own exception type, not an OSError):
    # a PNG whose header declares 20000x20000 pixels; PIL raises on open, before decoding any.
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0))
    bomb_png = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "c0" / "z_bomb.png").write_bytes(bomb_png)
    folder = CheckedImageFolder(tmp_path, None)
    bomb = next(i for i, (p, _) in enumerate(folder.samples) if p.endswith("z_bomb.png"))
    with pytest.raises(DataError, match="z_bomb.png is not a readable image: .*decompression bomb"):
        folder[bomb]

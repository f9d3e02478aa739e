"""The layout of 4-D image arrays: RGBA / grey+alpha N,H,W,C arrays read channels-last, ambiguous shapes refused
(docs/data.md, "Array layout"), end to end through the real pipeline and command line."""

from __future__ import annotations

import numpy as np
import pytest

from aisec_train.data.arrays import ArrayDataset, to_nchw, to_nchw_float
from aisec_train.data.config import DatasetConfig
from aisec_train.data.errors import DataError
from aisec_train.errors import ConfigError
from tests.conftest import read_report, run_cli


def rgba(n: int = 40, h: int = 6, w: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """N,H,W,4 uint8 images whose alpha channel is the label (the other channels noise)."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = (rng.random((n, h, w, 4)) * 255).astype(np.uint8)
    x[..., 3] = np.where(y[:, None, None] == 1, 255, 0)
    return x, y


# docs/data.md, "Array layout": (shape, the axis that holds channels)
LAYOUTS = [
    ((2, 8, 6, 4), 3),  # RGBA, non-square (the defect: read as 8 channels of 6x4)
    ((2, 32, 32, 4), 3),
    ((2, 8, 8, 2), 3),  # grey + alpha
    ((2, 28, 28, 1), 3),  # what was read right before stays so
    ((2, 32, 32, 3), 3),
    ((2, 32, 3, 3), 3),  # 32x3 RGB: only the last axis can be channels
    ((2, 3, 32, 32), 1),
    ((2, 4, 32, 32), 1),
    ((2, 1, 28, 28), 1),
    ((2, 3, 4, 4), 1),  # tiny images: RGB (3) beats RGBA (4)
    ((2, 4, 5, 3), 3),
    ((2, 3, 32, 4), 1),
    ((2, 13, 64, 64), 1),  # more than 4 channels: N,C,H,W
    ((2, 8, 8, 8), 1),
]


def test_the_channel_axis_follows_the_documented_rule():
    for shape, axis in LAYOUTS:
        x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        expected = x if axis == 1 else x.transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(to_nchw(x, "x"), expected, err_msg=str(shape))


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 32, 3), (2, 1, 28, 1), (2, 1, 8, 3), (2, 4, 4, 4), (2, 2, 9, 4), (2, 64, 64, 13), (2, 16, 32, 8)],
)
def test_an_ambiguous_shape_is_refused_naming_it_and_the_setting(shape):
    with pytest.raises(DataError) as err:
        to_nchw(np.zeros(shape, np.float32), "x", setting="dataset.channels_last")
    line = str(err.value)
    assert "\n" not in line and str(shape) in line and "ambiguous" in line
    assert "dataset.channels_last=true (N,H,W,C)" in line and "dataset.channels_last=false (N,C,H,W)" in line
    # said explicitly, either reading is taken as told
    assert to_nchw(np.zeros(shape, np.float32), "x", channels_last=False).shape == shape
    assert to_nchw(np.zeros(shape, np.float32), "x", channels_last=True).shape == (2, shape[3], shape[1], shape[2])


def test_the_model_input_shape_resolves_an_ambiguous_batch():
    x = np.zeros((5, 3, 32, 1), np.float32)
    assert to_nchw_float(x, "batch", expect=(1, 3, 32)).shape == (5, 1, 3, 32)
    assert to_nchw_float(x, "batch", expect=(3, 32, 1)).shape == (5, 3, 32, 1)
    with pytest.raises(DataError, match="ambiguous"):
        to_nchw_float(x, "batch")


def test_channels_last_on_an_array_without_channels_is_refused():
    with pytest.raises(DataError, match=r"dataset.channels_last=true is not allowed .* no channel axis"):
        to_nchw(np.zeros((4, 8, 8), np.float32), "x", channels_last=True, setting="dataset.channels_last")


def test_rgba_pixels_land_in_their_channels():
    x, y = rgba()
    data = ArrayDataset(x, y)
    assert data.shape == (4, 6, 5)
    image, label = data[1]
    assert tuple(image.shape) == (4, 6, 5) and label == 1
    np.testing.assert_allclose(image.numpy(), x[1].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert float(image[3].min()) == 1.0  # the alpha plane is channel 3, whole


def npz_source(path, **settings):
    """The npz source itself (what ``load_dataset`` reads before hashing and splitting: no sklearn import)."""
    from aisec_train.data.sources import SOURCES

    return SOURCES["npz"](DatasetConfig(name="npz", path=str(path), **settings), 0)


def test_npz_rgba_loads_channels_last_and_builds_a_four_channel_model(tmp_path):
    import torch

    from aisec_train.models.presets import build_model

    x, y = rgba()
    np.savez(tmp_path / "rgba.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:6], y=y[:6])
    data = npz_source(tmp_path / "rgba.npz", test_path=str(tmp_path / "test.npz"))
    assert data.train.shape == (4, 6, 5) and data.test.shape == (4, 6, 5)
    model = build_model("cnn", in_channels=data.train.shape[0], num_classes=2, image_size=(6, 5))
    assert model(torch.stack([data.train[i][0] for i in range(3)])).shape == (3, 2)


def test_npz_channels_last_setting(tmp_path):
    rng = np.random.default_rng(1)
    x, y = (rng.random((40, 3, 8, 3)) * 255).astype(np.uint8), np.arange(40) % 2
    np.savez(tmp_path / "amb.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"\(40, 3, 8, 3\), which is ambiguous.*dataset.channels_last=true"):
        npz_source(tmp_path / "amb.npz")
    assert npz_source(tmp_path / "amb.npz", channels_last=True).train.shape == (3, 3, 8)
    assert npz_source(tmp_path / "amb.npz", channels_last=False).train.shape == (3, 8, 3)


def test_channels_last_is_refused_for_another_source():
    from aisec_train.data.sources import check_source_keys

    with pytest.raises(ConfigError, match="dataset.channels_last=True is not allowed with dataset=digits"):
        check_source_keys(DatasetConfig(name="digits", channels_last=True))


@pytest.mark.slow
def test_rgba_npz_trains_end_to_end(tmp_path):
    """The command line on a tiny RGBA .npz, non-private, 1 epoch: a 4-channel model is trained and tagged."""
    x, y = rgba(n=60, h=8, w=6)
    np.savez(tmp_path / "rgba.npz", x=x, y=y)
    run = tmp_path / "run"
    env = {"AISEC_TRAIN_REGISTRY": str(tmp_path / "registry.json")}
    args = ["dataset=npz", f"dataset.path={tmp_path / 'rgba.npz'}", "privacy=none", "train.epochs=1"]
    args += ["audit=off", "robustness.evaluate=false", f"hydra.run.dir={run}"]
    done = run_cli(*args, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = read_report(run)
    assert report["data"]["shape"] == [4, 8, 6]
    # an ambiguous file: one line, exit 2, before any training
    np.savez(tmp_path / "amb.npz", x=np.zeros((60, 3, 8, 3), np.uint8), y=y)
    args = ["dataset=npz", f"dataset.path={tmp_path / 'amb.npz'}", "privacy=none", f"hydra.run.dir={tmp_path / 'r2'}"]
    done = run_cli(*args, env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "(60, 3, 8, 3)" in lines[0] and "dataset.channels_last=true" in lines[0]
    assert not (tmp_path / "r2" / "checkpoints").exists() and not (tmp_path / "r2" / "model.pt").exists()
    args = ["dataset=npz", f"dataset.path={tmp_path / 'amb.npz'}", "dataset.channels_last=maybe"]
    bad = run_cli(*args, f"hydra.run.dir={tmp_path / 'r3'}", env=env)
    assert bad.returncode == 2 and "dataset.channels_last" in bad.stderr and "Traceback" not in bad.stderr

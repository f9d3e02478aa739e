"""The natural-image stand-in for CIFAR-10 behind the DP-recipe figure (scripts/figures/natural_patches.py): train
and test crops come from disjoint tiles (never one shared pixel), the classes are balanced, and the arrays are the
same on every build. Built from the photographs scikit-learn and scikit-image ship (the `figures` extra)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "figures" / "natural_patches.py"


def _module():
    spec = importlib.util.spec_from_file_location("figure_natural_patches", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positions(patch: np.ndarray) -> set[tuple[int, int]]:
    """The source pixels of a crop of the coordinate image below (R: row, G: column)."""
    return set(zip(patch[..., 0].ravel().tolist(), patch[..., 1].ravel().tolist(), strict=True))


def test_train_and_test_crops_never_share_a_pixel_and_stay_inside_their_tiles():
    np_ = _module()
    rows, cols = np.meshgrid(np.arange(200), np.arange(240), indexing="ij")
    image = np.stack([rows, cols, (rows * 7 + cols * 13) % 251], axis=-1).astype(np.uint8)  # varied: not flat
    corners = np_.tiles(image.shape, 40)
    assert len(corners) == 5 * 6
    split = np_.assign(len(corners), {"test": 0.2, "val": 0.2}, np.random.default_rng(0))
    everything = np.concatenate(list(split.values()))
    assert sorted(everything.tolist()) == list(range(len(corners)))  # a partition of the tiles
    seen = {}
    for name, index in split.items():
        chosen = [corners[i] for i in index]
        x = np_.crops(image, chosen, 30, block=40, size=16, min_std=0.01, rng=np.random.default_rng(1))
        assert x.shape == (30, 16, 16, 3)
        assert len({p.tobytes() for p in x}) == 30  # distinct crops
        for patch in x:  # inside one of its split's tiles
            r, c = int(patch[0, 0, 0]), int(patch[0, 0, 1])
            assert any(r0 <= r <= r0 + 24 and c0 <= c <= c0 + 24 for r0, c0 in chosen)
        seen[name] = set().union(*(_positions(p) for p in x))
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"] and not seen["val"] & seen["test"]


def test_flat_crops_are_redrawn_and_a_set_too_flat_is_refused():
    np_ = _module()
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = np.random.default_rng(0).integers(0, 255, (64, 32, 3))  # left half flat, right half textured
    x = np_.crops(image, [(0, 0), (0, 32)], 20, block=32, size=16, min_std=0.02, rng=np.random.default_rng(0))
    assert all(p.std() / 255 >= 0.02 for p in x)
    try:
        np_.crops(image, [(0, 0)], 5, block=32, size=16, min_std=0.02, rng=np.random.default_rng(0))
    except SystemExit as err:
        assert "usable crops" in str(err)
    else:
        raise AssertionError("a tile of flat crops only must be refused")


def test_the_set_is_balanced_deterministic_and_from_the_shipped_photos():
    np_ = _module()
    args = argparse.Namespace(seed=0, test_fraction=0.2, val_fraction=0.0, train_per_class=12, test_per_class=4,
                              val_per_class=4, block=64, size=32, min_std=0.02)  # fmt: skip
    first, second = np_.build(args), np_.build(args)
    assert set(first) == {"train", "test"}
    for split, n in (("train", 12), ("test", 4)):
        x, y = first[split]
        assert x.shape == (10 * n, 32, 32, 3) and x.dtype == np.uint8
        assert np.bincount(y).tolist() == [n] * 10
        assert np.array_equal(x, second[split][0]) and np.array_equal(y, second[split][1])
    train = {p.tobytes() for p in first["train"][0]}
    assert not any(p.tobytes() in train for p in first["test"][0])

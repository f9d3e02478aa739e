"""The monitor self-check's shifts on non-square (H != W) images: a rotation is a rotation in pixel space."""

from __future__ import annotations

import math

import pytest
import torch

from aisec_train.audit import shifts


def bright_pixel(h: int, w: int, row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, 1, h, w)
    x[0, 0, row, col] = 1.0
    return x


def centroid(x: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted (row, col) offset from the image centre, in pixels."""
    h, w = x.shape[-2:]
    img = x[0, 0]
    rows, cols = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    total = img.sum()
    return float((img * rows).sum() / total - (h - 1) / 2), float((img * cols).sum() / total - (w - 1) / 2)


def test_rotation_keeps_distances_on_a_non_square_image():
    h, w = 12, 20
    x = bright_pixel(h, w, row=5, col=15)  # offset (-0.5, +5.5) from the centre (5.5, 9.5)
    for degrees in (25.0, 90.0):
        dy, dx = centroid(shifts.rotation(x, degrees))
        # a plain normalised-coordinate rotation would shrink the 5.5-pixel horizontal arm to 5.5 * 12 / 20 = 3.3
        assert math.hypot(dy, dx) == pytest.approx(math.hypot(-0.5, 5.5), abs=0.35), degrees
    dy, dx = centroid(shifts.rotation(x, 90.0))
    assert abs(dx) < 1.0 and abs(dy) > 4.5  # the horizontal arm became a vertical one


def test_rotation_by_zero_is_the_identity_and_shapes_are_kept():
    x = torch.rand(3, 2, 7, 11, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifts.rotation(x, 0.0), x, atol=1e-5, rtol=0)
    for name, batch in shifts.shifted_batches(x, seed=0).items():
        assert batch.shape == x.shape and batch.min() >= 0 and batch.max() <= 1, name


def test_occlusion_covers_the_centre_fraction_of_each_side():
    x = torch.zeros(2, 3, 10, 20)
    out = shifts.occlusion(x, fraction=0.4)
    mask = out[0, 0] == 1.0
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert rows.tolist() == [3, 4, 5, 6] and cols.tolist() == list(range(6, 14))  # 4 of 10 rows, 8 of 20 columns
    assert int(mask.sum()) == 32 and (out[:, :, mask] == 1.0).all()

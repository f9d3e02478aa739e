"""A generated image-folder dataset for the open-model figures: coloured shapes on noisy backgrounds.

Ten classes (disc, square, triangle, cross, ring, diamond, horizontal bar, vertical bar, X, dot pair) drawn at a
random position, size and colour on a random-colour noisy background, written as RGB PNGs in torchvision's
ImageFolder layout (ROOT/train/<class>/*.png, ROOT/test/<class>/*.png). Nothing is downloaded; the seed decides
every pixel.

    .venv/bin/python scripts/figures/shapes.py OUT_DIR --n 10000 --size 16 [--test 0.2] [--seed 0]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from aisec_train.errors import RefusingParser

CLASSES = ["disc", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar", "x", "dots"]


def mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.22, 0.38) * size
    cy, cx = rng.uniform(r, size - r, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    w = max(1.0, r / 3)
    shapes = {
        "disc": dy**2 + dx**2 <= r**2,
        "square": (abs(dy) <= r * 0.8) & (abs(dx) <= r * 0.8),
        "triangle": (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.55),
        "cross": ((abs(dy) <= w) & (abs(dx) <= r)) | ((abs(dx) <= w) & (abs(dy) <= r)),
        "ring": (dy**2 + dx**2 <= r**2) & (dy**2 + dx**2 >= (r * 0.55) ** 2),
        "diamond": abs(dy) + abs(dx) <= r,
        "hbar": (abs(dy) <= w) & (abs(dx) <= r),
        "vbar": (abs(dx) <= w) & (abs(dy) <= r),
        "x": ((abs(dy - dx) <= w) | (abs(dy + dx) <= w)) & (abs(dy) <= r) & (abs(dx) <= r),
        "dots": ((dy**2 + (dx - r * 0.6) ** 2) <= (r * 0.4) ** 2) | ((dy**2 + (dx + r * 0.6) ** 2) <= (r * 0.4) ** 2),
    }
    return shapes[kind]


def image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    background = rng.uniform(0, 255, 3)
    out = background + rng.normal(0, 25, (size, size, 3))
    colour = (background + rng.uniform(90, 165, 3)) % 255  # far from the background in every channel
    out[mask(kind, size, rng)] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def write(root: Path, n: int, size: int, test_fraction: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    n_test = int(round(n * test_fraction))
    for split, count in (("train", n - n_test), ("test", n_test)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            kind = CLASSES[i % len(CLASSES)]
            Image.fromarray(image(kind, size, rng)).save(root / split / kind / f"{i:06d}.png")
    return root


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--test", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.out, args.n, args.size, args.test, args.seed))


if __name__ == "__main__":
    main()

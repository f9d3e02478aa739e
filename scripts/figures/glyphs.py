"""A second, digits-sized image dataset for the backdoor figures: ten letters (A-J) typeset in 22 fonts.

notMNIST-style: each sample is one of the letters A-J drawn in one of the TrueType faces that ship inside
matplotlib (DejaVu Sans/Serif/Mono, STIX and Computer Modern, upright, bold and italic), with a random
affine jitter (rotation, scale, shear, shift), a random stroke weight and pixel noise, box-averaged down to
12x12 grey levels. It shares nothing with scikit-learn's handwritten digits except the format: other classes,
typeset rather than handwritten strokes, another resolution, other corner statistics. Nothing is downloaded;
the same seed gives the same bytes on the same matplotlib (its fonts and rasteriser).

    python scripts/figures/glyphs.py --out glyphs.npz          # 1800 images, x uint8 (N, 12, 12), y int64
    aisec-train experiment=backdoor dataset=npz dataset.path=glyphs.npz

Any size: every sample draws its font (22) and a continuous jitter, so ``--n 20000`` gives 20,000 distinct
images (checked: no duplicate among them), balanced over the ten classes, in ~12 s of CPU (~1 ms a sample
once the 220 prototypes are rendered). The federated figures (issue 14) use the typeset digits at 20k:

    python scripts/figures/glyphs.py --out glyphs20k.npz --n 20000 --alphabet digits
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from scipy import ndimage

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

ALPHABETS = {"digits": "0123456789", "letters": "ABCDEFGHIJ"}
FONTS = [
    *(f"DejaVu{f}{s}.ttf" for f in ("Sans", "Serif") for s in ("", "-Bold", "-Oblique", "-BoldOblique")),
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    *(f"STIXGeneral{s}.ttf" for s in ("", "Bol", "Italic", "BolIta")),
    *(f"cm{s}10.ttf" for s in ("r", "b", "ss", "ti", "tt", "mi")),
]
CANVAS = 48  # rendering resolution (divisible by 8, 12, 16 and 24); every sample is box-averaged from it
BOX = 34  # the side a glyph's larger extent is scaled to before jitter (MNIST-like margins)


def _font_path(name: str) -> Path:
    # DejaVu's serif faces are named "DejaVuSerif-Oblique" nowhere: they are "-Italic".
    name = name.replace("Serif-Oblique", "Serif-Italic").replace("Serif-BoldOblique", "Serif-BoldItalic")
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


@cache
def prototype(letter: str, font: str) -> np.ndarray:
    """The letter rendered in ``font``, cropped to its ink and centred in a CANVAS x CANVAS float image."""
    fig = Figure(figsize=(1, 1), dpi=4 * CANVAS)
    canvas = FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, letter, fontproperties=FontProperties(fname=_font_path(font), size=40), ha="center", va="center")
    canvas.draw()
    ink = 1.0 - np.asarray(canvas.buffer_rgba())[..., 0].astype(np.float64) / 255.0
    rows, cols = np.flatnonzero(ink.max(1) > 0.1), np.flatnonzero(ink.max(0) > 0.1)
    glyph = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    glyph = ndimage.zoom(glyph, BOX / max(glyph.shape), order=1)
    out = np.zeros((CANVAS, CANVAS))
    top, left = (CANVAS - glyph.shape[0]) // 2, (CANVAS - glyph.shape[1]) // 2
    out[top : top + glyph.shape[0], left : left + glyph.shape[1]] = glyph[: CANVAS - top, : CANVAS - left]
    return np.clip(out, 0.0, 1.0)


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle, scale, shear = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(0.8, 1.1), rng.uniform(-0.2, 0.2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inverse = np.linalg.inv(forward)  # affine_transform maps output coordinates to input ones
    centre = np.array([CANVAS / 2, CANVAS / 2])
    shift = rng.uniform(-3, 3, size=2)
    offset = centre - inverse @ (centre + shift)
    out = ndimage.affine_transform(img, inverse, offset=offset, order=1)
    weight = rng.integers(-1, 4)  # erode thin, dilate bold: stroke widths vary within a font, as in handwriting
    if weight > 0:
        out = ndimage.grey_dilation(out, size=(weight + 1, weight + 1))
    elif weight < 0:
        out = ndimage.grey_erosion(out, size=(-weight + 1, -weight + 1))
    return out


def make(n: int = 1800, size: int = 12, seed: int = 0, alphabet: str = "digits") -> tuple[np.ndarray, np.ndarray]:
    """``n`` balanced samples of ``ALPHABETS[alphabet]``: (x uint8 (n, size, size), y int64 (n,)), shuffled."""
    if CANVAS % size:
        raise ValueError(f"size={size} must divide the rendering canvas {CANVAS}")
    glyphs = ALPHABETS[alphabet]
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(glyphs)
    rng.shuffle(y)
    fonts = rng.integers(0, len(FONTS), size=n)
    block = CANVAS // size
    x = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        img = _jitter(prototype(glyphs[y[i]], FONTS[fonts[i]]), rng)
        small = img.reshape(size, block, size, block).mean(axis=(1, 3))  # box average: anti-aliased downsampling
        small = np.clip(small + rng.normal(0.0, 0.03, small.shape), 0.0, 1.0)
        x[i] = np.round(small * 255).astype(np.uint8)
    return x, y.astype(np.int64)


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=output_file, required=True, help="the .npz to write (x, y)")
    parser.add_argument("--n", type=int, default=1800)
    parser.add_argument("--size", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alphabet", choices=sorted(ALPHABETS), default="digits")
    args = parser.parse_args()
    x, y = make(args.n, args.size, args.seed, args.alphabet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, x=x, y=y)
    print(f"wrote {args.out}: x {x.shape} {x.dtype}, y {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main()

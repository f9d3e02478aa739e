"""A small natural-image classification set built offline from the photographs that installed packages ship: a
stand-in for CIFAR-10 (which cannot be downloaded here), for issue 24's DP-recipe figure.

**What it is.** Ten RGB photographs, one class each: scikit-learn's ``load_sample_images`` (china, flower) and
scikit-image's bundled files (astronaut, chelsea, coffee, hubble_deep_field, ihc, motorcycle_left, retina,
rocket), read from the installed wheels' folders (no pooch download). Photos whose short side exceeds 512 pixels
are downscaled to 512 (Lanczos), so a 32x32 crop shows a comparable amount of scene. A record is a 32x32 RGB crop;
its label is the photo it came from.

**Train and test never share a pixel.** Each photo is cut into a grid of ``--block`` x ``--block`` tiles; a seeded
fraction of each photo's tiles is test (and, with ``--val-fraction``, another fraction validation, for tuning
without touching the test split); every crop lies inside one tile. Crops are drawn uniformly over a split's tiles
at distinct positions; near-constant crops (pixel std below ``--min-std``: a black sky or border could come from
several photos) are redrawn. Classes are balanced.

**What it is not.** Not CIFAR: ten scenes instead of ten object categories, so crops of one class share one
scene's colours and textures, and test tiles are unseen regions of the same photographs. It measures whether a
private model generalises to unseen natural-image content; absolute accuracies are not comparable with CIFAR's.

Deterministic: the same arguments give byte-identical arrays (``--seed``), recorded with their sha256.

    .venv/bin/python scripts/figures/natural_patches.py --out DIR            # DIR/train.npz, DIR/test.npz
    .venv/bin/python scripts/figures/natural_patches.py --out DIR --val-fraction 0.2   # + DIR/val.npz
    aisec-train dataset=npz dataset.path=DIR/train.npz dataset.test_path=DIR/test.npz ...
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from aisec_train.errors import RefusingParser

SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
MAX_SIDE = 512


def photos() -> list[tuple[str, np.ndarray]]:
    """The ten photographs, ``(name, uint8 H x W x 3)``, in class order, from the installed packages only."""
    import skimage
    import sklearn

    folders = {
        "sklearn": Path(sklearn.__file__).parent / "datasets" / "images",
        "skimage": Path(skimage.__file__).parent / "data",
    }
    files = [("sklearn", f) for f in SKLEARN_PHOTOS] + [("skimage", f) for f in SKIMAGE_PHOTOS]
    out = []
    for package, name in files:
        path = folders[package] / name
        if not path.is_file():
            raise SystemExit(f"natural_patches: {path} is missing: pip install -e '.[figures]' (scikit-image)")
        image = Image.open(path).convert("RGB")
        short = min(image.size)
        if short > MAX_SIDE:
            image = image.resize((round(image.width * MAX_SIDE / short), round(image.height * MAX_SIDE / short)),
                                 Image.Resampling.LANCZOS)  # fmt: skip
        out.append((name.rsplit(".", 1)[0], np.asarray(image, dtype=np.uint8)))
    return out


def tiles(shape: tuple[int, ...], block: int) -> list[tuple[int, int]]:
    """Top-left corners of the whole ``block`` x ``block`` tiles of an image."""
    return [(r, c) for r in range(0, shape[0] - block + 1, block) for c in range(0, shape[1] - block + 1, block)]


def assign(n_tiles: int, fractions: dict[str, float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Tile indices per split: a seeded permutation, each held-out split at least one tile; the rest is train."""
    order = rng.permutation(n_tiles)
    out, start = {}, 0
    for split, fraction in fractions.items():
        count = max(1, round(fraction * n_tiles))
        out[split] = order[start : start + count]
        start += count
    if start >= n_tiles:
        raise SystemExit(f"natural_patches: {n_tiles} tiles leave none for training; use a smaller --block")
    out["train"] = order[start:]
    return out


def crops(image, corners, count, *, block, size, min_std, rng) -> np.ndarray:
    """``count`` distinct, not near-constant ``size`` crops lying inside the given tiles."""
    per_tile = (block - size + 1) ** 2
    seen, out = set(), []
    for _ in range(count * 50):
        if len(out) == count:
            break
        tile = int(rng.integers(len(corners)))
        offset = int(rng.integers(per_tile))
        if (tile, offset) in seen:
            continue
        seen.add((tile, offset))
        r = corners[tile][0] + offset // (block - size + 1)
        c = corners[tile][1] + offset % (block - size + 1)
        patch = image[r : r + size, c : c + size]
        if patch.astype(np.float32).std() / 255.0 >= min_std:
            out.append(patch)
    if len(out) < count:
        raise SystemExit(f"natural_patches: only {len(out)} of {count} usable crops; lower --min-std or the count")
    return np.stack(out)


def build(args) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(args.seed)
    held = {"test": args.test_fraction, **({"val": args.val_fraction} if args.val_fraction else {})}
    counts = {"train": args.train_per_class, "test": args.test_per_class, "val": args.val_per_class}
    parts: dict[str, list] = {split: [] for split in ["train", *held]}
    for label, (_name, image) in enumerate(photos()):
        corners = tiles(image.shape, args.block)
        for split, index in assign(len(corners), held, rng).items():
            chosen = [corners[i] for i in sorted(index)]
            x = crops(image, chosen, counts[split], block=args.block, size=args.size, min_std=args.min_std, rng=rng)
            parts[split].append((x, np.full(len(x), label, dtype=np.int64)))
    return {s: (np.concatenate([x for x, _ in p]), np.concatenate([y for _, y in p])) for s, p in parts.items()}


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.npz, test.npz (and val.npz)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--block", type=int, default=64, help="tile side: crops never cross a tile")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--val-fraction", type=float, default=0.0, help="> 0: also a validation split (tuning)")
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--min-std", type=float, default=0.02, help="redraw crops flatter than this (0-1 scale)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.block < args.size:
        raise SystemExit(f"natural_patches: --block={args.block} is not allowed: must be >= --size={args.size}")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"classes": [name for name, _ in photos()], "args": {k: str(v) for k, v in vars(args).items()}}
    for split, (x, y) in build(args).items():
        np.savez(args.out / f"{split}.npz", x=x, y=y)
        manifest[split] = {"n": len(y), "sha256": hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps({k: v for k, v in manifest.items() if k != "args"}))


if __name__ == "__main__":
    main()

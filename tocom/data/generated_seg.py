"""A generated semantic segmentation task, written in the ADE20k folder layout.

Each image pastes 1 to 4 shapes (circle, square, triangle, cross, star) of random colour, size,
angle and position on a background: a random crop of a natural image when a folder of them is
given (e.g. the shared ImageNet sample), else a procedural texture (coloured gratings and
noise). The mask labels each pixel with its shape class, ``background`` elsewhere, and 0
(ignored, as in ADE20k) on a one-pixel band along every shape's outline, where the class is
ambiguous after resizing. Colour never identifies a class: only the outline does.

Everything is deterministic from ``seed`` (and the background images, when given).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._io import find_images, load_rgb
from .generated import _polygon
from .segmentation import split_dir

SEG_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "cross", "star")
"""Class names of the generated task; mask value ``k + 1`` is class ``k``."""


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S, 3) float background: a colour gradient plus two coloured gratings."""
    g = np.linspace(0.0, 1.0, size)
    xx, yy = np.meshgrid(g, g, indexing="xy")
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + 0.5 * (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)) * 1.4, 0, 1)
    out = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(2):
        freq, phi = rng.uniform(3, 12), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(phi) * xx + np.sin(phi) * yy) + rng.uniform(0, 6.3))
        out = out + wave[..., None] * rng.uniform(-40, 40, 3)
    return out


def _crop(rng: np.random.Generator, images: list[Path], size: int) -> np.ndarray:
    """(S, S, 3) float: a random square crop (30-100% of the short side) of a random image."""
    image = load_rgb(images[int(rng.integers(len(images)))])
    w, h = image.size
    side = int(min(w, h) * rng.uniform(0.3, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return np.asarray(image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC), np.float32)


def _outline(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    return None if kind == "circle" else _polygon(kind, cx, cy, r, angle)


def render_sample(rng: np.random.Generator, size: int, backgrounds: list[Path] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(S, S, 3)`` uint8 and its ADE20k-style mask ``(S, S)`` uint8 (0 ignored)."""
    bg = _crop(rng, backgrounds, size) if backgrounds else _texture(rng, size)
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 1)  # 1 = background
    draw_i, draw_m = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SEG_CLASSES)))
        kind = SEG_CLASSES[cls]
        r = rng.uniform(0.1, 0.2) * size
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        color = tuple(int(v) for v in rng.uniform(0, 255, 3))
        poly = _outline(kind, cx, cy, r, angle)
        box = (cx - r, cy - r, cx + r, cy + r)
        if poly is None:
            draw_i.ellipse(box, fill=color)
            draw_m.ellipse(box, fill=cls + 1, outline=0, width=1)
        else:
            draw_i.polygon(poly, fill=color)
            draw_m.polygon(poly, fill=cls + 1)
            draw_m.line([*poly, poly[0]], fill=0, width=1)
    arr = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 10), (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8), np.asarray(mask, np.uint8)


def write_segmentation_task(root: str | Path, seed: int = 0, image_size: int = 224,
                            splits: dict[str, int] | None = None, backgrounds: str | Path | None = None,
                            overwrite: bool = False) -> Path:
    """Write the generated task to ``root`` in the ADE20k layout (readable by ``SegmentationFolder``).

    Args:
        splits: split name -> images (default ``{"train": 400, "val": 100, "test": 100}``); train
            and val go to ``training/`` and ``validation/`` like ADE20k, others to their own name.
        backgrounds: a folder of natural images to crop backgrounds from; None: procedural textures.

    Writes ``images/<split>/NNNNNN.jpg`` (quality 95), ``annotations/<split>/NNNNNN.png`` and
    ``classes.txt``. Each split has its own random stream derived from ``seed``.

    Raises:
        FileExistsError: ``root`` already holds ``classes.txt`` and ``overwrite`` is False.
    """
    if seed < 0 or image_size < 16:
        raise ValueError(f"need seed >= 0 and image_size >= 16, got {seed}, {image_size}")
    root = Path(root)
    if (root / "classes.txt").exists() and not overwrite:
        raise FileExistsError(f"{root} already holds a task; pass overwrite=True or choose another folder")
    pool = None
    if backgrounds is not None:
        pool = find_images(Path(backgrounds))
        if not pool:
            raise FileNotFoundError(f"no background images found under {backgrounds}")
    for name, n in (splits or {"train": 400, "val": 100, "test": 100}).items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        images, masks = root / "images" / split_dir(name), root / "annotations" / split_dir(name)
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask = render_sample(rng, image_size, pool)
            Image.fromarray(image).save(images / f"{i:06d}.jpg", quality=95)
            Image.fromarray(mask).save(masks / f"{i:06d}.png")
    # Written last: an interrupted run leaves no classes.txt, so a re-run is not refused.
    (root / "classes.txt").write_text("".join(c + "\n" for c in SEG_CLASSES), encoding="utf-8")
    return root

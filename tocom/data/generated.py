"""Procedurally generated image tasks in the spirit of VTAB's Structured group.

Each task draws simple shapes with PIL on a random two-colour gradient background with
per-image Gaussian noise, random colours, sizes and positions, so that the label is the only
thing kept fixed: a small ViT can learn it, a fixed pixel rule cannot.

==============  =======  ==================================================================
task            classes  label
==============  =======  ==================================================================
``count``       6        number of shapes (1..6) minus one
``location``    9        cell of a 3x3 grid holding the one object (row-major)
``orientation`` 8        angle of a bar in [0, 180) degrees, in 22.5-degree bins
``shape``       6        circle, square, triangle, cross, star, ring
==============  =======  ==================================================================

Everything is deterministic from ``seed``: same arguments, identical pixels.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .vtab import LIST_FILES

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "ring")

_CLASSES: dict[str, list[str]] = {
    "count": [f"{k} object{'s' if k > 1 else ''}" for k in range(1, 7)],
    "location": [f"{r}-{c}" for r in ("top", "middle", "bottom") for c in ("left", "centre", "right")],
    "orientation": [f"{22.5 * k:g}-{22.5 * (k + 1):g}deg" for k in range(8)],
    "shape": list(SHAPES),
}

TASKS: dict[str, int] = {name: len(classes) for name, classes in _CLASSES.items()}
"""Generated task name -> number of classes."""


# --------------------------------------------------------------------------- drawing


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius ``r`` centred at (cx, cy), rotated by ``angle`` radians."""
    if kind == "square":
        a = np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full(4, r * 0.9)  # 0.9: about the same area as the circle of radius r
    elif kind == "triangle":
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, r * 1.1)
    elif kind == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.5)
    elif kind == "cross":
        w = 0.33
        xy = np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                       (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)])  # fmt: skip
        a, rad = np.arctan2(xy[:, 1], xy[:, 0]), np.hypot(xy[:, 0], xy[:, 1]) * r
    else:
        raise ValueError(f"not a polygon shape: {kind!r}")
    a = a + angle
    return list(zip((cx + rad * np.cos(a)).tolist(), (cy + rad * np.sin(a)).tolist(), strict=True))


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, color: tuple[int, ...]
) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(2, round(r * 0.4)))
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=color)


class _Canvas:
    """Random background for one image, plus helpers that keep foreground colours visible."""

    def __init__(self, rng: np.random.Generator, size: int, grid: np.ndarray):
        self.rng, self.size = rng, size
        self.c0, self.c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        theta = rng.uniform(0, 2 * np.pi)
        # grid: (2, S, S) coordinates in [-1, 1]; t in [0, 1] runs along a random direction.
        t = (np.cos(theta) * grid[0] + np.sin(theta) * grid[1]) / (2 * np.sqrt(2)) + 0.5
        bg = self.c0 * (1 - t[..., None]) + self.c1 * t[..., None]
        self.image = Image.fromarray(bg.astype(np.uint8))
        self.draw = ImageDraw.Draw(self.image)

    def color(self) -> tuple[int, int, int]:
        """A random colour far enough from both background end colours to stay visible."""
        for _ in range(50):
            c = self.rng.uniform(0, 255, 3)
            if min(np.linalg.norm(c - self.c0), np.linalg.norm(c - self.c1)) > 90:
                return tuple(int(v) for v in c)
        return tuple(int(v) for v in 255 - (self.c0 + self.c1) / 2)  # rare: mid-grey backgrounds

    def finish(self, specks: int = 0) -> np.ndarray:
        """Add ``specks`` tiny distractor dots and Gaussian noise; return ``(S, S, 3)`` uint8."""
        for _ in range(specks):
            x, y = self.rng.uniform(0, self.size, 2)
            d = self.rng.uniform(0.5, 1.5) * self.size / 64
            self.draw.ellipse(
                (x - d, y - d, x + d, y + d), fill=tuple(int(v) for v in self.rng.uniform(0, 255, 3))
            )
        arr = np.asarray(self.image, dtype=np.float32)
        arr = arr + self.rng.normal(0.0, self.rng.uniform(2, 14), arr.shape)
        return np.clip(arr, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- tasks


def _count(c: _Canvas, label: int) -> np.ndarray:
    s, rng = c.size, c.rng
    radii = rng.uniform(0.07, 0.11, label + 1) * s
    gap = 2.3 * radii.max()
    while True:  # rejection sampling of non-overlapping centres; 6 small objects fit easily
        centres: list[np.ndarray] = []
        for _ in range(300):
            p = rng.uniform(0.12 * s, 0.88 * s, 2)
            if all(np.linalg.norm(p - q) > gap for q in centres):
                centres.append(p)
                if len(centres) == label + 1:
                    break
        if len(centres) == label + 1:
            break
    for (cx, cy), r in zip(centres, radii, strict=True):
        kind = SHAPES[rng.integers(0, 3)]  # circle/square/triangle: count, not shape, matters
        _draw_shape(c.draw, kind, cx, cy, r, rng.uniform(0, 2 * np.pi), c.color())
    return c.finish()


def _location(c: _Canvas, label: int) -> np.ndarray:
    s, rng = c.size, c.rng
    row, col = divmod(label, 3)
    cx, cy = (col + rng.uniform(0.3, 0.7)) * s / 3, (row + rng.uniform(0.3, 0.7)) * s / 3
    kind = SHAPES[rng.integers(0, len(SHAPES))]
    _draw_shape(c.draw, kind, cx, cy, rng.uniform(0.08, 0.12) * s, rng.uniform(0, 2 * np.pi), c.color())
    return c.finish(specks=int(rng.integers(0, 4)))


def _orientation(c: _Canvas, label: int) -> np.ndarray:
    s, rng = c.size, c.rng
    theta = np.deg2rad(rng.uniform(22.5 * label, 22.5 * (label + 1)))  # counter-clockwise from +x
    half_len, half_w = rng.uniform(0.25, 0.4) * s, rng.uniform(0.04, 0.07) * s
    cx, cy = s / 2 + rng.uniform(-0.08, 0.08, 2) * s
    u = np.array([np.cos(theta), -np.sin(theta)])  # image y points down
    v = np.array([-u[1], u[0]])
    corners = [
        np.array([cx, cy]) + a * half_len * u + b * half_w * v
        for a, b in ((1, 1), (1, -1), (-1, -1), (-1, 1))
    ]
    c.draw.polygon([tuple(p.tolist()) for p in corners], fill=c.color())
    return c.finish(specks=int(rng.integers(0, 4)))


def _shape(c: _Canvas, label: int) -> np.ndarray:
    s, rng = c.size, c.rng
    r = rng.uniform(0.18, 0.3) * s
    cx, cy = rng.uniform(r * 1.2, s - r * 1.2, 2)
    _draw_shape(c.draw, SHAPES[label], cx, cy, r, rng.uniform(0, 2 * np.pi), c.color())
    return c.finish(specks=int(rng.integers(0, 4)))


_RENDER: dict[str, Callable[[_Canvas, int], np.ndarray]] = {
    "count": _count,
    "location": _location,
    "orientation": _orientation,
    "shape": _shape,
}


class GeneratedTask(Dataset):
    """An in-memory generated task.

    Items are ``(image, label: int)``: an RGB PIL image of ``image_size x image_size`` (or
    ``transform`` of it, e.g. a ``(3, H, W)`` tensor).

    Attributes:
        name, classes, num_classes: the task, its class names and their count.
        images: ``(n, S, S, 3)`` uint8 array of all images.
        labels: ``(n,)`` int64 array; classes are balanced (counts differ by at most one).
    """

    def __init__(
        self,
        name: str,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[Image.Image], Any] | None = None,
    ):
        self.name = name
        self.classes: list[str] = list(_CLASSES[name])
        self.num_classes: int = len(self.classes)
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __repr__(self) -> str:
        return f"GeneratedTask(name={self.name!r}, n={len(self)}, image_size={self.images.shape[1]})"


def _generate(name: str, n: int, entropy: Sequence[int], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    if name not in _RENDER:
        raise ValueError(f"unknown generated task {name!r}; choose one of {sorted(TASKS)}")
    if n < 1 or image_size < 16:
        raise ValueError(f"need n >= 1 and image_size >= 16, got n={n}, image_size={image_size}")
    # crc32 of the name (not hash(), which is salted per process) gives each task its own stream.
    rng = np.random.default_rng([*entropy, zlib.crc32(name.encode())])
    labels = rng.permutation(np.arange(n) % TASKS[name]).astype(np.int64)
    g = np.linspace(-1.0, 1.0, image_size)
    grid = np.stack(np.meshgrid(g, g, indexing="xy"))
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i] = _RENDER[name](_Canvas(rng, image_size, grid), label)
    return images, labels


def make_task(
    name: str,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    transform: Callable[[Image.Image], Any] | None = None,
) -> GeneratedTask:
    """Generate ``n`` images of task ``name`` (one of :data:`TASKS`), deterministic from ``seed``."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    images, labels = _generate(name, n, [seed], image_size)
    return GeneratedTask(name, images, labels, transform)


def write_vtab(
    name: str,
    root: str | Path,
    seed: int = 0,
    image_size: int = 64,
    n_train: int = 800,
    n_val: int = 200,
    n_test: int = 1000,
    fmt: str = "png",
    overwrite: bool = False,
) -> Path:
    """Write a generated task to ``root`` in the VTAB-1k folder format, readable by :class:`VTAB1k`.

    Writes ``images/{train800,val200,test}/NNNNNN.<fmt>``, ``train800.txt``, ``val200.txt``,
    ``train800val200.txt``, ``test.txt`` and ``classes.txt``. The folder and file names are the
    format's fixed names even when ``n_train``/``n_val`` are not 800/200. Each split comes from
    its own random stream derived from ``seed``, so splits never share images and each is
    class-balanced. ``fmt`` is ``"png"`` (lossless) or ``"jpg"`` (quality 95, like real VTAB).

    Returns:
        ``root`` as a Path.

    Raises:
        FileExistsError: ``root`` already holds VTAB list files and ``overwrite`` is False.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"fmt must be 'png' or 'jpg', got {fmt!r}")
    root = Path(root)
    existing = [f"{s}.txt" for s in LIST_FILES if (root / f"{s}.txt").exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{root} already holds {existing}; pass overwrite=True or choose another folder"
        )
    lines: dict[str, list[str]] = {}
    for split_id, (split, n) in enumerate((("train800", n_train), ("val200", n_val), ("test", n_test)), 1):
        images, labels = _generate(name, n, [seed, split_id], image_size)
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            fname = f"{i:06d}.{fmt}"
            Image.fromarray(img).save(folder / fname, **({"quality": 95} if fmt != "png" else {}))
            lines[split].append(f"images/{split}/{fname} {label}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    # List files last: an interrupted run leaves no list file, so a re-run is not refused.
    (root / "classes.txt").write_text("".join(c + "\n" for c in _CLASSES[name]), encoding="utf-8")
    for stem in LIST_FILES:
        (root / f"{stem}.txt").write_text("".join(lines[stem]), encoding="utf-8")
    return root

"""ImageFolder-style datasets: labelled split folders, and a flat bag of unlabelled images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ._io import IMG_EXTENSIONS, LabelledImages, find_images, load_rgb

SPLIT_DIRS: tuple[str, ...] = ("train", "val", "test")
"""Split folder names recognised under an ImageFolder root."""

FOLDER_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val",),
    "trainval": ("train", "val"),
    "test": ("test",),
}
"""Generic split names -> the split folders they are made of."""


def folder_splits(root: str | Path) -> list[str]:
    """Split folders (``train``/``val``/``test``) present under ``root``."""
    root = Path(root)
    return [s for s in SPLIT_DIRS if (root / s).is_dir()]


def _class_dirs(split_dir: Path) -> list[str]:
    return [p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]


class ImageFolderSplit(LabelledImages):
    """One split of a ``root/{train,val,test}/<class>/<image>`` layout.

    The class list is the sorted union of class folder names over *all* split folders present,
    so label ``i`` means the same class in every split even when a split lacks some classes.

    Args:
        root: folder holding ``train/``, ``val/`` and/or ``test/``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"`` (train and val together).
        transform: applied to the RGB PIL image (e.g. to a ``(3, H, W)`` float tensor).

    Items are ``(image, label: int)``. Images inside a class folder are found recursively.

    Attributes:
        classes: sorted class folder names; ``num_classes = len(classes)``.
        samples: ``(image path, label)`` per item, sorted by split, class, then path.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable[[Image.Image], Any] | None = None):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        if split not in FOLDER_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(FOLDER_SPLITS)}")
        present = folder_splits(self.root)
        if not present:
            raise FileNotFoundError(
                f"no split folders in {self.root}; expected {self.root}/train/<class>/<image> "
                "(and/or val/, test/)"
            )
        missing = [d for d in FOLDER_SPLITS[split] if d not in present]
        if missing:
            raise FileNotFoundError(
                f"split {split!r} needs folder(s) {missing} under {self.root}; splits present: {present}"
            )
        self.classes: list[str] = sorted({c for d in present for c in _class_dirs(self.root / d)})
        self.num_classes: int = len(self.classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for d in FOLDER_SPLITS[split]:
            for cls in sorted(_class_dirs(self.root / d)):
                self.samples += [(p, index[cls]) for p in find_images(self.root / d / cls)]
        if not self.samples:
            raise FileNotFoundError(
                f"no images for split {split!r} under {self.root} (looked in "
                f"{[str(self.root / d) + '/<class>/' for d in FOLDER_SPLITS[split]]} for {IMG_EXTENSIONS})"
            )

    def verify(self) -> None:
        """Check that every image still exists (files may vanish after indexing)."""
        missing = [str(p) for p, _ in self.samples if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images missing under {self.root}, e.g. {missing[:5]}")

    def __repr__(self) -> str:
        return (
            f"ImageFolderSplit(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"num_classes={self.num_classes})"
        )


class ImageFiles(Dataset):
    """Every image under a folder (recursively), without labels: for self-distillation.

    Extensions: jpg, jpeg, png, bmp, webp (case-insensitive); other files such as
    ``labels.txt`` are ignored. Items are ``(image, 0)`` so a standard ``(x, y)`` training loop
    can consume them; the 0 is a placeholder, not a label.

    Args:
        root: the folder to search.
        transform: applied to the RGB PIL image (e.g. to a ``(3, H, W)`` float tensor).
        decode_once: decode every image now and keep it in memory, so that epochs (and loader
            workers, which inherit the decoded images) only augment. For small folders such as
            the 1000-image ImageNet sample, where JPEG decoding bounds a GPU's step rate.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None,
                 decode_once: bool = False):
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.files: list[Path] = find_images(self.root)
        if not self.files:
            raise FileNotFoundError(f"no images with extensions {IMG_EXTENSIONS} found under {self.root}")
        self.decoded: list[Image.Image] | None = [load_rgb(f) for f in self.files] if decode_once else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_rgb(self.files[index]) if self.decoded is None else self.decoded[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, 0

    def __repr__(self) -> str:
        return f"ImageFiles(root={str(self.root)!r}, n={len(self)})"

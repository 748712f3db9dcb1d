"""Semantic segmentation data in the ADE20k folder layout, and a generated task written in it.

Layout (ADEChallengeData2016, as read by mmseg)::

    root/images/<split>/NAME.jpg        RGB images
    root/annotations/<split>/NAME.png   single-channel masks, same size as the image
    root/classes.txt                    optional: one class name per line (without "other")

Mask value 0 means "other / unlabelled" and is ignored; value ``k >= 1`` is class ``k - 1``
(mmseg's ``reduce_zero_label``). Items are ``(image (3, S, S) float, mask (S, S) int64)`` with
ignored pixels set to :data:`IGNORE_INDEX`. ``"train"`` / ``"val"`` are ADE20k's ``training`` /
``validation`` folders; any other split name is a folder name as it is.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from ._io import find_images, load_rgb

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
SEG_SPLITS: dict[str, str] = {"train": "training", "val": "validation"}

JointTransform = Callable[[Image.Image, Image.Image], tuple[Any, Any]]


def split_dir(split: str) -> str:
    """The folder name of ``split`` (``train`` -> ``training``, ``val`` -> ``validation``)."""
    return SEG_SPLITS.get(split, split)


def is_segmentation_folder(root: str | Path) -> bool:
    """Whether ``root`` has the ``images/`` + ``annotations/`` layout."""
    root = Path(root)
    return (root / "images").is_dir() and (root / "annotations").is_dir()


class SegmentationTransform:
    """Joint transform of an image and its mask: squash-resize both to ``size`` (bicubic image,
    nearest mask), a random horizontal flip when training, normalise the image and shift labels.

    Returns ``(image (3, size, size) float, mask (size, size) int64)``; mask value 0 becomes
    :data:`IGNORE_INDEX`, ``k`` becomes ``k - 1``.
    """

    def __init__(self, size: int, train: bool = False, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        self.size, self.train, self.mean, self.std = int(size), train, tuple(mean), tuple(std)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.resize((self.size, self.size), Image.BICUBIC)
        mask = mask.resize((self.size, self.size), Image.NEAREST)
        # Python's `random`: re-seeded per item by the training loader, so runs are reproducible.
        if self.train and random.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        tensor = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        return tensor, reduce_zero_label(torch.from_numpy(np.asarray(mask, dtype=np.int64).copy()))

    def record(self) -> dict[str, Any]:
        """The evaluation preprocessing as data (see :func:`tocom.data.preprocessing_record`)."""
        return {"resize": "squash", "size": self.size, "interpolation": "bicubic", "crop_pct": 1.0,
                "mean": list(self.mean), "std": list(self.std)}


def reduce_zero_label(mask: torch.Tensor) -> torch.Tensor:
    """ADE20k labels to training targets: 0 -> :data:`IGNORE_INDEX`, ``k`` -> ``k - 1``. Any shape."""
    return torch.where(mask == 0, torch.full_like(mask, IGNORE_INDEX), mask - 1)


class SegmentationFolder(Dataset):
    """One split of an ADE20k-layout folder; items ``transform(image, mask)``.

    Without a transform, items are ``(PIL RGB image, (H, W) int64 tensor of raw mask values)``.
    Every mask is checked when read: single channel, the image's size, values in
    ``0..num_classes``; a bad one raises ValueError naming the file.

    Attributes:
        classes, num_classes: class names (from ``classes.txt``, else ``class1, ...``) and count.
        samples: ``(image path, mask path)`` pairs, sorted by name.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: JointTransform | None = None,
                 num_classes: int | None = None):
        self.root, self.split, self.transform = Path(root), split, transform
        if not is_segmentation_folder(self.root):
            raise FileNotFoundError(f"{self.root} is not an ADE20k-layout folder: expected images/ and "
                                    "annotations/ folders, each with one folder per split")
        images_dir = self.root / "images" / split_dir(split)
        masks_dir = self.root / "annotations" / split_dir(split)
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"split {split!r} needs the folder {folder}, which is missing")
        masks = {p.relative_to(masks_dir).with_suffix("").as_posix(): p for p in find_images(masks_dir)}
        self.samples: list[tuple[Path, Path]] = []
        lacking = []
        for image in find_images(images_dir):
            key = image.relative_to(images_dir).with_suffix("").as_posix()
            if key in masks:
                self.samples.append((image, masks[key]))
            else:
                lacking.append(image.name)
        if lacking:
            raise FileNotFoundError(f"{len(lacking)} images in {images_dir} have no mask in {masks_dir} "
                                    f"(e.g. {lacking[0]}); add NAME.png masks or remove those images")
        if not self.samples:
            raise ValueError(f"{images_dir} holds no images")
        names_file = self.root / "classes.txt"
        if names_file.is_file():
            names = [ln.strip() for ln in names_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            names = [f"class{k}" for k in range(1, (num_classes or ADE20K_CLASSES) + 1)]
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"{names_file} names {len(names)} classes but num_classes={num_classes}")
        self.classes, self.num_classes = names, len(names)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The raw image and mask of sample ``index``, after checking the mask."""
        image_path, mask_path = self.samples[index]
        image = load_rgb(image_path)
        try:
            with Image.open(mask_path) as m:
                m.load()
                mask = m.copy()
        except OSError as err:
            raise ValueError(f"cannot read mask {mask_path}: {err}; re-extract or delete it") from err
        if mask.mode not in ("L", "P", "I;16", "I"):
            raise ValueError(f"mask {mask_path} has mode {mask.mode}; masks must be single-channel "
                             "label images (PNG of class indices), not colour pictures")
        if mask.size != image.size:
            raise ValueError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                             f"{image_path.name} is {image.size[0]}x{image.size[1]}; masks must match "
                             "their image pixel for pixel")
        top = int(np.asarray(mask).max())
        if top > self.num_classes:
            raise ValueError(f"mask {mask_path} holds label {top}, but the dataset has {self.num_classes} "
                             f"classes (labels 0..{self.num_classes}, 0 ignored); fix the mask or "
                             "classes.txt")
        return image, mask

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, mask = self.read(index)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())

    def __repr__(self) -> str:
        return f"SegmentationFolder({str(self.root)!r}, split={self.split!r}, n={len(self)})"

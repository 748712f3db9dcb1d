"""Datasets: VTAB-1k list folders, ImageFolder splits, unlabelled image folders, generated tasks,
ADE20k-layout segmentation folders, and the transforms that turn their PIL images into tensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .folder import FOLDER_SPLITS, SPLIT_DIRS, ImageFiles, ImageFolderSplit, folder_splits
from .generated import TASKS, GeneratedTask, make_task, write_vtab
from .generated_seg import SEG_CLASSES, write_segmentation_task
from .segmentation import IGNORE_INDEX, SegmentationFolder, SegmentationTransform, is_segmentation_folder
from .shared import shared_dir
from .transforms import (
    data_config,
    eval_transform,
    preprocessing_record,
    train_transform,
    transform_from_record,
)
from .vtab import LIST_FILES, VTAB_SPLITS, VTAB1k, vtab_splits

SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")
"""Split names accepted by :func:`load_dataset`."""


def detect_format(root: str | Path) -> str:
    """``"vtab"`` when ``root`` holds a VTAB-1k list file, ``"folder"`` when it holds
    ``train/``/``val/``/``test/`` folders; raises ValueError (saying what was expected) otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    # List files win: a VTAB-1k task folder may also hold an images/ tree, never train/ dirs.
    if vtab_splits(root):
        return "vtab"
    if folder_splits(root):
        return "folder"
    raise ValueError(
        f"{root} is neither a VTAB-1k task folder (expected {', '.join(s + '.txt' for s in LIST_FILES)}) "
        f"nor an ImageFolder split layout (expected {'/, '.join(SPLIT_DIRS)}/ folders of <class>/<image>); "
        "for unlabelled images use ImageFiles(root)"
    )


def load_dataset(
    root: str | Path, split: str, transform: Callable[[Image.Image], Any] | None = None
) -> Dataset:
    """Open ``split`` of the dataset at ``root``, detecting its format.

    Splits: ``"train"`` (VTAB ``train800`` / folder ``train``), ``"val"`` (``val200`` / ``val``),
    ``"trainval"`` (``train800val200`` / ``train`` + ``val``), ``"test"`` (``test`` / ``test``).
    Returns a :class:`VTAB1k` or :class:`ImageFolderSplit`; both have ``classes``,
    ``num_classes`` and items ``(transform(image), label: int)``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if detect_format(root) == "vtab":
        return VTAB1k(root, VTAB_SPLITS[split], transform)
    return ImageFolderSplit(root, split, transform)


__all__ = [
    "FOLDER_SPLITS",
    "IGNORE_INDEX",
    "SEG_CLASSES",
    "SegmentationFolder",
    "SegmentationTransform",
    "is_segmentation_folder",
    "write_segmentation_task",
    "LIST_FILES",
    "SPLITS",
    "TASKS",
    "VTAB_SPLITS",
    "GeneratedTask",
    "ImageFiles",
    "ImageFolderSplit",
    "VTAB1k",
    "data_config",
    "detect_format",
    "folder_splits",
    "eval_transform",
    "load_dataset",
    "shared_dir",
    "make_task",
    "preprocessing_record",
    "train_transform",
    "transform_from_record",
    "vtab_splits",
    "write_vtab",
]

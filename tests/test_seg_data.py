"""ADE20k-layout segmentation folders, the joint transform, mask checks and the generated task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tocom.data import (
    IGNORE_INDEX,
    SEG_CLASSES,
    SegmentationFolder,
    SegmentationTransform,
    is_segmentation_folder,
    write_segmentation_task,
)
from tocom.data.generated_seg import render_sample


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg") / "task"
    return write_segmentation_task(root, seed=1, image_size=48, splits={"train": 6, "val": 3, "test": 2})


def test_generated_task_in_ade20k_layout(task):
    assert is_segmentation_folder(task)
    for split, n in (("training", 6), ("validation", 3), ("test", 2)):
        assert len(list((task / "images" / split).glob("*.jpg"))) == n
        assert len(list((task / "annotations" / split).glob("*.png"))) == n
    data = SegmentationFolder(task, "train")
    assert data.classes == list(SEG_CLASSES) and data.num_classes == 6 and len(data) == 6
    image, mask = data[0]
    assert image.size == (48, 48) and mask.shape == (48, 48) and mask.dtype == torch.int64
    values = set(torch.unique(mask).tolist())
    assert 0 in values and 1 in values and values <= set(range(7))  # outline, background, shapes
    assert len(SegmentationFolder(task, "val")) == 3 and len(SegmentationFolder(task, "test")) == 2


def test_generated_masks_match_the_drawn_shapes():
    # Where the mask says "shape", the pixels differ from the background the shape was drawn on.
    a = render_sample(np.random.default_rng(3), 64)
    b = render_sample(np.random.default_rng(3), 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # deterministic
    image, mask = a
    shape_px, bg_px = image[mask >= 2].astype(float), image[mask == 1].astype(float)
    assert len(shape_px) > 50 and len(bg_px) > 50
    assert np.abs(shape_px.mean(0) - bg_px.mean(0)).max() > 5 or shape_px.std() < bg_px.std()


def test_natural_backgrounds(tmp_path):
    folder = tmp_path / "bg"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "a.png")
    root = write_segmentation_task(tmp_path / "t", image_size=32, splits={"train": 2}, backgrounds=folder)
    assert len(SegmentationFolder(root, "train")) == 2
    with pytest.raises(FileNotFoundError, match="no background images"):
        write_segmentation_task(tmp_path / "u", image_size=32, splits={"train": 1},
                                backgrounds=tmp_path / "t" / "x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_segmentation_task(root, image_size=32, splits={"train": 1})


def test_transform_shifts_labels_and_keeps_pixels_aligned():
    image = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3)))
    mask = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8)[None, :], (8, 1)))  # label = column
    x, m = SegmentationTransform(8)(image, mask)
    assert x.shape == (3, 8, 8) and m.dtype == torch.int64
    assert (m[:, 0] == IGNORE_INDEX).all() and m[0, 1:].tolist() == list(range(7))  # 0 ignored, k -> k-1
    flips = 0
    for seed in range(20):
        import random

        random.seed(seed)
        x, m = SegmentationTransform(8, train=True)(image, mask)
        flipped = m[0, 0] == 6
        flips += int(flipped)
        # image and mask flip together: the brightest column carries the largest label
        assert int(x[0, 0].argmax()) == int((m[0] * (m[0] != IGNORE_INDEX)).argmax())
    assert 0 < flips < 20


def _write(root, split, name, image, mask):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{name}.jpg")
    Image.fromarray(mask).save(root / "annotations" / split / f"{name}.png")


def test_bad_masks_get_errors_naming_the_file(tmp_path):
    root = tmp_path / "ade"
    good = np.zeros((16, 16, 3), np.uint8)
    _write(root, "training", "ok", good, np.ones((16, 16), np.uint8))
    _write(root, "training", "small", good, np.ones((8, 16), np.uint8))
    _write(root, "training", "high", good, np.full((16, 16), 7, np.uint8))
    Image.fromarray(good).save(root / "annotations" / "training" / "rgb.png")
    Image.fromarray(good).save(root / "images" / "training" / "rgb.jpg")
    (root / "classes.txt").write_text("a\nb\nc\n")
    data = SegmentationFolder(root, "train")
    names = [img.stem for img, _ in data.samples]
    assert data.num_classes == 3 and data[names.index("ok")][1].eq(1).all()
    with pytest.raises(ValueError, match=r"small\.png is 16x8 but its image small\.jpg is 16x16"):
        data[names.index("small")]
    with pytest.raises(ValueError, match=r"high\.png holds label 7.*3 classes"):
        data[names.index("high")]
    with pytest.raises(ValueError, match=r"rgb\.png has mode RGB"):
        data[names.index("rgb")]


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/ and annotations/"):
        SegmentationFolder(tmp_path, "train")
    _write(tmp_path, "training", "a", np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="validation"):
        SegmentationFolder(tmp_path, "val")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "training" / "b.jpg")
    with pytest.raises(FileNotFoundError, match="no mask.*b.jpg"):
        SegmentationFolder(tmp_path, "train")
    (tmp_path / "images" / "training" / "b.jpg").unlink()
    assert SegmentationFolder(tmp_path, "train").num_classes == 150  # ADE20k's, without classes.txt

"""VTAB1k: the community VTAB-1k list format, on tiny folders written in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tocom.data import VTAB1k


def _write_task(root: Path, labels: dict[str, list[int]], classes: list[str] | None = None) -> Path:
    """A VTAB-1k folder: per split stem, 8x8 images whose red channel encodes the item index."""
    for stem, labs in labels.items():
        folder = root / "images" / stem
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, label in enumerate(labs):
            Image.fromarray(np.full((8, 8, 3), (i * 10, label * 20, 0), np.uint8)).save(
                folder / f"{i:06d}.png"
            )
            lines.append(f"images/{stem}/{i:06d}.png {label}\n")
        (root / f"{stem}.txt").write_text("".join(lines))
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_reads_items_labels_and_classes(tmp_path):
    root = _write_task(tmp_path, {"train800": [0, 2, 1], "test": [1]}, classes=["a", "b", "c", "d"])
    ds = VTAB1k(root, "train800")
    assert len(ds) == 3 and ds.targets == [0, 2, 1]
    assert ds.classes == ["a", "b", "c", "d"] and ds.num_classes == 4  # classes.txt wins over max label
    image, label = ds[1]
    assert image.mode == "RGB" and image.size == (8, 8) and label == 2
    assert image.getpixel((0, 0)) == (10, 40, 0)  # the file listed on line 2, not another
    assert VTAB1k(root, "train").targets == ds.targets  # generic alias -> train800


def test_num_classes_without_classes_txt_agrees_across_splits(tmp_path):
    root = _write_task(tmp_path, {"train800": [0, 4], "val200": [1]})
    assert VTAB1k(root, "val200").num_classes == 5  # from train800's label 4, not val's max 1
    assert VTAB1k(root, "val200").classes == ["0", "1", "2", "3", "4"]


def test_transform_is_applied(tmp_path):
    root = _write_task(tmp_path, {"test": [3]})
    ds = VTAB1k(root, "test", transform=lambda im: np.asarray(im).shape)
    assert ds[0] == ((8, 8, 3), 3)


def test_missing_split_file_lists_present_splits(tmp_path):
    root = _write_task(tmp_path, {"train800": [0], "test": [0]})
    with pytest.raises(FileNotFoundError, match=r"val200\.txt.*\['train800', 'test'\]"):
        VTAB1k(root, "val")


def test_malformed_line_names_file_and_line(tmp_path):
    root = _write_task(tmp_path, {"test": [0, 1]})
    with open(root / "test.txt", "a") as f:
        f.write("images/test/000002.png\n")  # line 3: no label
    with pytest.raises(ValueError, match=r"test\.txt:3: expected '<image path> <integer label>'"):
        VTAB1k(root, "test")


def test_non_integer_label_names_line(tmp_path):
    root = _write_task(tmp_path, {"test": [0]})
    (root / "test.txt").write_text("images/test/000000.png 0\n\nimages/test/000000.png cat\n")
    with pytest.raises(ValueError, match=r"test\.txt:3: label 'cat' is not an integer"):
        VTAB1k(root, "test")


def test_label_out_of_range_for_classes_txt(tmp_path):
    root = _write_task(tmp_path, {"test": [0, 1, 5]}, classes=["a", "b"])
    with pytest.raises(ValueError, match=r"test\.txt:3: label 5 is out of range for the 2 classes"):
        VTAB1k(root, "test")


def test_negative_label_rejected(tmp_path):
    root = _write_task(tmp_path, {"test": [0]})
    (root / "test.txt").write_text("images/test/000000.png -1\n")
    with pytest.raises(ValueError, match=r"test\.txt:1: label -1 is negative"):
        VTAB1k(root, "test")


def test_missing_image_found_by_verify_and_on_load(tmp_path):
    root = _write_task(tmp_path, {"test": [0, 1]})
    (root / "images" / "test" / "000001.png").unlink()
    ds = VTAB1k(root, "test")  # lazy: construction does not stat every file
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images.*000001\.png \(test\.txt:2\)"):
        ds.verify()
    with pytest.raises(FileNotFoundError, match=r"000001\.png \(listed at .*test\.txt:2\)"):
        ds[1]
    assert ds[0][1] == 0  # the intact file still loads


def test_corrupt_image_raises_runtime_error_naming_file(tmp_path):
    root = _write_task(tmp_path, {"test": [0, 1]})
    bad = root / "images" / "test" / "000000.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(RuntimeError, match=r"cannot read image .*000000\.png"):
        VTAB1k(root, "test")[0]


def test_truncated_image_raises_runtime_error(tmp_path):
    root = tmp_path
    (root / "images" / "test").mkdir(parents=True)
    path = root / "images" / "test" / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])  # header intact, pixel data cut
    (root / "test.txt").write_text("images/test/a.jpg 0\n")
    with pytest.raises(RuntimeError, match=r"a\.jpg"):
        VTAB1k(root, "test")[0]

"""load_dataset, format detection, VTAB task groups, and the real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tocom.data import (
    ImageFiles,
    ImageFolderSplit,
    VTAB1k,
    detect_format,
    load_dataset,
)

SHARED = Path(os.environ.get("TOCOM_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real data lives in ../shared; set TOCOM_SHARED to point elsewhere)")
    return path


def test_real_vtab_cifar10():
    root = _shared("data/vtab-1k/cifar10")
    sizes = {s: len(VTAB1k(root, s)) for s in ("train800", "val200", "train800val200", "test")}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 2000}
    train = load_dataset(root, "train")
    assert isinstance(train, VTAB1k) and train.num_classes == 10 and train.classes[0] == "airplane"
    assert np.bincount(train.targets).tolist() == [80] * 10  # balanced 80 per class
    train.verify()
    image, label = load_dataset(root, "test")[0]
    assert image.mode == "RGB" and image.size == (32, 32) and 0 <= label < 10


def test_real_imagenet_sample_as_unlabelled_images():
    ds = ImageFiles(_shared("data/imagenet-sample"))
    assert len(ds) == 1000  # labels.txt / synsets.txt are not images
    image, label = ds[0]
    assert image.mode == "RGB" and label == 0 and min(image.size) <= 256


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def test_load_dataset_maps_split_names(tmp_path):
    vtab = tmp_path / "vtab"
    for stem, n in (("train800", 3), ("val200", 2), ("train800val200", 5), ("test", 1)):
        (vtab / f"{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
        (vtab / f"{stem}.txt").write_text("".join(f"images/x/{i}.png 0\n" for i in range(n)))
    assert detect_format(vtab) == "vtab"
    assert {s: len(load_dataset(vtab, s)) for s in ("train", "val", "trainval", "test")} == {
        "train": 3, "val": 2, "trainval": 5, "test": 1,
    }  # fmt: skip
    folder = tmp_path / "folder"
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for i in range(n):
            _png(folder / split / "c" / f"{i}.png")
    assert detect_format(folder) == "folder"
    ds = load_dataset(folder, "trainval", transform=lambda im: im.size)
    assert isinstance(ds, ImageFolderSplit) and len(ds) == 5 and ds[0] == ((4, 4), 0)
    with pytest.raises(ValueError, match="unknown split 'train800'"):
        load_dataset(vtab, "train800")  # only the four generic names, for both formats


def test_unrecognised_folder_says_what_was_expected(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(
        ValueError, match=r"neither a VTAB-1k.*train800\.txt.*ImageFolder.*train/.*ImageFiles"
    ):
        load_dataset(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="not found"):
        detect_format(tmp_path / "missing")


def test_shared_folder_is_never_guessed_from_the_current_directory(tmp_path, monkeypatch):
    from tocom.data import shared_dir

    (tmp_path / "shared" / "weights").mkdir(parents=True)  # a ../shared beside the working directory
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.delenv("TOCOM_SHARED", raising=False)
    assert shared_dir() is None
    assert shared_dir("../shared") == (tmp_path / "shared").resolve()  # explicit: relative to the cwd
    monkeypatch.setenv("TOCOM_SHARED", str(tmp_path / "elsewhere"))
    assert shared_dir() == (tmp_path / "elsewhere").resolve()
    assert shared_dir(tmp_path / "shared") == (tmp_path / "shared").resolve()  # the argument wins

"""ImageFolderSplit and ImageFiles on tiny folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tocom.data import ImageFiles, ImageFolderSplit


def _img(path: Path, value: int = 0, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path) -> Path:
    _img(tmp_path / "train" / "cat" / "a.jpg", 10)
    _img(tmp_path / "train" / "cat" / "sub" / "b.PNG", 20)  # nested, upper-case suffix
    _img(tmp_path / "train" / "dog" / "c.png", 30)
    _img(tmp_path / "val" / "dog" / "d.png", 40)
    _img(tmp_path / "test" / "ant" / "e.png", 50)  # a class only the test split has
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_classes_are_union_over_splits(folder):
    train = ImageFolderSplit(folder, "train")
    assert train.classes == ["ant", "cat", "dog"] and train.num_classes == 3
    assert train.targets == [1, 1, 2]  # notes.txt ignored; sub/b.PNG found
    assert ImageFolderSplit(folder, "val").targets == [2]  # 'dog' is label 2 in every split
    assert ImageFolderSplit(folder, "test").targets == [0]
    image, label = ImageFolderSplit(folder, "val")[0]
    assert image.mode == "RGB" and image.size == (5, 6) and label == 2


def test_trainval_concatenates(folder):
    tv = ImageFolderSplit(folder, "trainval", transform=lambda im: im.getpixel((0, 0))[0])
    assert len(tv) == 4 and tv.targets == [1, 1, 2, 2]
    assert tv[3][0] == 40  # val's image comes last


def test_folder_errors(folder, tmp_path_factory):
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        ImageFolderSplit(folder, "validation")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="no split folders"):
        ImageFolderSplit(empty, "train")
    (empty / "train" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="split 'val' needs folder"):
        ImageFolderSplit(empty, "val")
    with pytest.raises(FileNotFoundError, match="no images for split 'train'"):
        ImageFolderSplit(empty, "train")


def test_corrupt_image_in_folder(folder):
    (folder / "val" / "dog" / "d.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(RuntimeError, match=r"d\.png"):
        ImageFolderSplit(folder, "val")[0]


def test_image_files_recursive_sorted_unlabelled(folder):
    ds = ImageFiles(folder / "train", transform=lambda im: im.getpixel((0, 0))[0])
    assert [p.name for p in ds.files] == ["a.jpg", "b.PNG", "c.png"]  # sorted by path, recursive
    assert ds[2] == (30, 0)
    _img(folder / "x" / "y.webp", 1, fmt="WEBP")
    _img(folder / "x" / "z.BMP", 1, fmt="BMP")
    assert len(ImageFiles(folder / "x")) == 2


def test_image_files_none_found(tmp_path):
    (tmp_path / "labels.txt").write_text("a 1\n")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFiles(tmp_path)


def test_decode_once_gives_the_same_items_as_decoding_each_time(tmp_path):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from tocom.data import ImageFiles

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    augment = T.Compose([T.RandomResizedCrop(16), T.ToTensor()])
    lazy, cached = ImageFiles(tmp_path, augment), ImageFiles(tmp_path, augment, decode_once=True)
    assert cached.decoded is not None and len(cached.decoded) == 3
    for i in range(3):
        torch.manual_seed(i)
        a = lazy[i][0]
        torch.manual_seed(i)
        assert torch.equal(a, cached[i][0])  # same pixels, same augmentation draw
    (tmp_path / "0.png").unlink()  # the cached copy no longer reads the disk
    assert cached[0][0].shape == (3, 16, 16)

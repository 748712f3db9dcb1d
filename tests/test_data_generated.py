"""Generated tasks: determinism, labels, and the VTAB-1k round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tocom.data import TASKS, VTAB1k, load_dataset, make_task, write_vtab


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_balanced_and_in_range(name):
    a, b = make_task(name, 36, seed=1, image_size=32), make_task(name, 36, seed=1, image_size=32)
    c = make_task(name, 36, seed=2, image_size=32)
    assert a.images.tobytes() == b.images.tobytes() and np.array_equal(a.labels, b.labels)
    assert a.images.tobytes() != c.images.tobytes()
    assert a.images.shape == (36, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.num_classes == TASKS[name] == len(a.classes) and a.name == name
    counts = np.bincount(a.labels, minlength=a.num_classes)
    assert len(counts) == a.num_classes and counts.max() - counts.min() <= 1  # balanced, all in range
    image, label = a[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and label == a.labels[0]
    assert a.images.std() > 10  # not blank: noise, backgrounds and shapes were drawn


def test_tasks_table():
    assert TASKS == {"count": 6, "location": 9, "orientation": 8, "shape": 6}


def test_images_depend_on_label():
    # Same seed stream, so the only systematic difference between the classes is the label:
    # class-mean images of the location task must differ in where the object is.
    task = make_task("location", 180, seed=0, image_size=32)
    bg = task.images.astype(np.float32)
    dev = np.abs(bg - np.median(bg, axis=(1, 2), keepdims=True)).mean(-1)  # (n, 32, 32) "objectness"
    top_left = dev[task.labels == 0][:, :10, :10].mean() - dev[task.labels == 0][:, 22:, 22:].mean()
    bottom_right = dev[task.labels == 8][:, 22:, 22:].mean() - dev[task.labels == 8][:, :10, :10].mean()
    assert top_left > 5 and bottom_right > 5


def test_unknown_task_and_transform():
    with pytest.raises(ValueError, match="unknown generated task 'colour'.*count"):
        make_task("colour", 4)
    task = make_task("shape", 2, image_size=16, transform=lambda im: im.size)
    assert task[1][0] == (16, 16)


def test_write_vtab_round_trip(tmp_path):
    root = write_vtab("orientation", tmp_path / "ori", seed=3, image_size=24, n_train=16, n_val=8, n_test=8)
    for stem in ("train800", "val200", "train800val200", "test"):
        assert (root / f"{stem}.txt").is_file()
    assert (root / "classes.txt").read_text().splitlines() == make_task("orientation", 1).classes
    assert (root / "train800.txt").read_text().splitlines()[0].startswith("images/train800/000000.png ")
    train, val = VTAB1k(root, "train800"), VTAB1k(root, "val200")
    trainval, test = VTAB1k(root, "train800val200"), load_dataset(root, "test")
    assert (len(train), len(val), len(trainval), len(test)) == (16, 8, 24, 8)
    assert train.num_classes == 8 and test.classes == train.classes
    assert trainval.targets == train.targets + val.targets
    train.verify()
    image, _ = train[0]
    assert image.size == (24, 24)
    # PNG is lossless: a re-generated train split reproduces the files' pixels.
    again = write_vtab(
        "orientation", tmp_path / "again", seed=3, image_size=24, n_train=16, n_val=8, n_test=8
    )
    assert np.array_equal(np.asarray(VTAB1k(again, "train")[5][0]), np.asarray(train[5][0]))
    # splits come from separate streams: no train image reappears in test
    train_px = {np.asarray(train[i][0]).tobytes() for i in range(len(train))}
    assert not any(np.asarray(test[i][0]).tobytes() in train_px for i in range(len(test)))


def test_write_vtab_refuses_to_overwrite(tmp_path):
    root = write_vtab("count", tmp_path, image_size=16, n_train=6, n_val=6, n_test=6, fmt="jpg")
    assert (root / "images" / "test" / "000000.jpg").is_file()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_vtab("count", tmp_path, image_size=16, n_train=6, n_val=6, n_test=6)
    write_vtab("shape", tmp_path, image_size=16, n_train=6, n_val=6, n_test=6, overwrite=True)
    assert VTAB1k(tmp_path, "test").classes[0] == "circle"

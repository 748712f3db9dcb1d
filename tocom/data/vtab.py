"""The community VTAB-1k folder format (as distributed with NOAH / PYRA / ToCom code).

Layout of one task folder::

    <root>/
        images/train800/000000.jpg ...
        images/val200/...
        images/test/...
        train800.txt  val200.txt  train800val200.txt  test.txt   # "images/<split>/<file> <label>"
        classes.txt                                               # optional, one class name a line
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from ._io import LabelledImages

LIST_FILES: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
"""Stems of the list files a VTAB-1k task folder holds (``<stem>.txt``)."""

VTAB_SPLITS: dict[str, str] = {
    "train": "train800",
    "val": "val200",
    "trainval": "train800val200",
    "test": "test",
}
"""Generic split names -> VTAB-1k list-file stems."""


def _parse_list(path: Path) -> list[tuple[str, int, int]]:
    """Parse one list file into ``(relative_path, label, line_number)`` entries."""
    entries = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue  # trailing blank lines are common in hand-edited lists
        # rsplit: the label is the last field, so file names with spaces still parse.
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(
                f"{path}:{lineno}: expected '<image path> <integer label>', got {raw!r}; "
                "fix or delete the line"
            )
        rel, label_txt = parts
        try:
            label = int(label_txt)
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: label {label_txt!r} is not an integer (line {raw!r}); "
                "expected '<image path> <integer label>'"
            ) from None
        if label < 0:
            raise ValueError(f"{path}:{lineno}: label {label} is negative; labels must be 0..num_classes-1")
        entries.append((rel, label, lineno))
    return entries


def _read_classes(root: Path) -> list[str] | None:
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    return [n for n in names if n]


def vtab_splits(root: str | Path) -> list[str]:
    """List-file stems present in ``root`` (e.g. ``["train800", "val200", ...]``)."""
    root = Path(root)
    return [s for s in LIST_FILES if (root / f"{s}.txt").is_file()]


class VTAB1k(LabelledImages):
    """One split of a VTAB-1k task in the community folder format.

    Args:
        root: the task folder (holds ``train800.txt`` etc.).
        split: a list-file stem (``"train800"``, ``"val200"``, ``"train800val200"``, ``"test"``) or a
            generic name (``"train"``, ``"val"``, ``"trainval"``, ``"test"``).
        transform: applied to the RGB PIL image; e.g. one returning a ``(3, H, W)`` float tensor.

    Items are ``(image, label)``: the transformed image (PIL RGB image of the file's size when
    ``transform`` is None) and an ``int`` in ``[0, num_classes)``.

    Attributes:
        classes: class names, from ``classes.txt`` when present, else ``["0", "1", ...]``.
        num_classes: ``len(classes)``. Without ``classes.txt`` it is 1 + the largest label over
            *all* list files in ``root``, so every split of a task agrees on it.
        samples: ``(absolute image path, label)`` per item.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable[[Image.Image], Any] | None = None):
        self.root = Path(root)
        self.split = VTAB_SPLITS.get(split, split)
        self.transform = transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"VTAB-1k task folder not found: {self.root}")
        list_path = self.root / f"{self.split}.txt"
        if not list_path.is_file():
            present = vtab_splits(self.root)
            raise FileNotFoundError(
                f"no list file {list_path.name} in {self.root} for split {split!r}; "
                f"splits present: {present or 'none'} (generic names: {sorted(VTAB_SPLITS)})"
            )
        entries = _parse_list(list_path)
        if not entries:
            raise ValueError(f"{list_path} lists no images; expected lines '<image path> <integer label>'")

        classes = _read_classes(self.root)
        if classes is not None:
            for _, label, lineno in entries:
                if label >= len(classes):
                    raise ValueError(
                        f"{list_path}:{lineno}: label {label} is out of range for the {len(classes)} "
                        f"classes in {self.root / 'classes.txt'}; fix the label or add the missing "
                        "class names to classes.txt"
                    )
        else:
            # Labels of the other splits count too: a class absent from val200 must not
            # shrink val's num_classes below train's.
            top = max(label for _, label, _ in entries)
            for stem in vtab_splits(self.root):
                if stem != self.split:
                    top = max([top] + [label for _, label, _ in _parse_list(self.root / f"{stem}.txt")])
            classes = [str(i) for i in range(top + 1)]
        self.classes: list[str] = classes
        self.num_classes: int = len(classes)
        self._list_path = list_path
        self._linenos = [lineno for _, _, lineno in entries]
        self.samples: list[tuple[Path, int]] = [(self.root / rel, label) for rel, label, _ in entries]

    def where(self, index: int) -> str:
        return f"{self._list_path}:{self._linenos[index]}"

    def verify(self) -> None:
        """Check that every listed image file exists (does not decode them).

        Raises:
            FileNotFoundError: naming up to 5 missing files with their list-file lines.
        """
        missing = [
            f"{path} ({self._list_path.name}:{lineno})"
            for (path, _), lineno in zip(self.samples, self._linenos, strict=True)
            if not path.is_file()
        ]
        if missing:
            shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.samples)} images listed in {self._list_path} are missing: "
                f"{shown}. Re-extract the task folder or fix the list file."
            )

    def __repr__(self) -> str:
        return (
            f"VTAB1k(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"num_classes={self.num_classes})"
        )

"""Image file helpers shared by the dataset classes: one place decides what an image file is
and how a broken one is reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_image_file(path: Path) -> bool:
    """True for a visible file whose suffix is a known image extension (case-insensitive)."""
    # Hidden files (".DS_Store", "._x.jpg" from macOS archives) are never images we want.
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def find_images(folder: Path) -> list[Path]:
    """All image files under ``folder``, searched recursively, sorted by path for a stable order."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def load_rgb(path: Path, where: str = "") -> Image.Image:
    """Open ``path`` and return it decoded as an RGB PIL image.

    ``where`` (e.g. ``"train800.txt:17"``) is added to error messages so a user can find the
    entry that points at a bad file.

    Raises:
        FileNotFoundError: the file does not exist.
        RuntimeError: PIL cannot identify or fully decode the file (corrupt or truncated).
    """
    suffix = f" (listed at {where})" if where else ""
    try:
        with Image.open(path) as img:
            # convert() forces the full decode inside the try, so a truncated file fails here
            # with its name rather than later inside a DataLoader worker.
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"image file not found: {path}{suffix}; restore the file or remove its entry"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RuntimeError(
            f"cannot read image {path}{suffix}: {err}; the file is corrupt or not an image, "
            "re-extract or delete it"
        ) from err


class LabelledImages(Dataset):
    """Base of the labelled datasets: ``samples`` is a list of ``(path, label)``; items are
    ``(transform(image), label)``. Subclasses say where a sample came from via :meth:`where`."""

    samples: list[tuple[Path, int]]
    transform: Any

    def where(self, index: int) -> str:
        """Text added to image errors to locate the sample's entry (empty by default)."""
        return ""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_rgb(path, where=self.where(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def targets(self) -> list[int]:
        """Labels of all items, in order (torchvision-style; for samplers and class counts)."""
        return [label for _, label in self.samples]

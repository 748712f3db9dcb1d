"""Request bodies to model inputs: untrusted image bytes decoded in memory, the checkpoint's transform."""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP")
# A 4000 x 4000 photo, more than a 12 MP phone's. Decoding costs memory and CPU in proportion to
# the pixels, whatever the file's size (a 190 KB PNG of 7000 x 7000 took 1.6 s and 374 MB), and a
# classifier at 224 px gains nothing from more; ``tocom serve --max-pixels`` changes it.
MAX_PIXELS = 16_000_000


class BadImage(ValueError):
    """The bytes are not an image this service accepts (the message says why)."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """JPEG, PNG or WebP bytes of any mode -> an RGB image (first frame of animations).

    Images over ``max_pixels`` are refused from their header, before any pixel is decoded.
    """
    if not data:
        raise BadImage("empty body; send the image file's bytes as the request body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"image of {w}x{h} pixels is over the {max_pixels} pixel limit; "
                               "send a smaller image")
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")  # no second copy when RGB
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage(f"not a decodable image; accepted formats: {', '.join(FORMATS)}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as err:
        raise BadImage(f"image could not be decoded: {err}") from None


def class_names(meta: dict[str, str], path: str | None, num_classes: int) -> list[str] | None:
    """Class names from a file (one per line) or the checkpoint's ``classes`` metadata, else None."""
    names: Any = None
    if path:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        source = path
    elif "classes" in meta:
        names = json.loads(meta["classes"])
        source = "the checkpoint's metadata"
    if names is None:
        return None
    if not isinstance(names, list) or len(names) != num_classes:
        raise ValueError(f"{source} lists {len(names) if isinstance(names, list) else 'no list of'} class "
                         f"names but the model has {num_classes} classes; give one name per class")
    return [str(n) for n in names]

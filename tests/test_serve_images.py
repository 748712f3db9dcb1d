"""Layer 8 without Ray: untrusted request bodies to model inputs."""

from __future__ import annotations

import io
import json

import pytest
from conftest import tiny_vit
from PIL import Image

from tocom.data import transform_from_record
from tocom.finetuned import recorded_preprocessing
from tocom.serve.images import BadImage, class_names, decode_image


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("RGBA", "WEBP"),
                                       ("CMYK", "JPEG"), ("RGB", "JPEG")])
def test_any_mode_decodes_to_rgb(mode, fmt):
    img = decode_image(encode(Image.new(mode, (21, 13)), fmt))
    assert img.mode == "RGB" and img.size == (21, 13)


def test_undecodable_bodies_say_why():
    with pytest.raises(BadImage, match="empty body"):
        decode_image(b"")
    with pytest.raises(BadImage, match="accepted formats: JPEG, PNG, WEBP"):
        decode_image(encode(Image.new("RGB", (8, 8)), "GIF"))  # a real image, but not accepted
    with pytest.raises(BadImage, match="could not be decoded"):
        decode_image(encode(Image.new("RGB", (64, 64), (9, 99, 199)), "PNG")[:80])
    with pytest.raises(BadImage, match="pixel limit"):  # a tiny file that would decode to 56 MP
        decode_image(encode(Image.new("1", (8000, 7000)), "PNG"))


def test_vtab_checkpoints_are_served_squash_resized():
    model = tiny_vit()
    wide = Image.new("RGB", (96, 32))
    wide.paste((255, 0, 0), (0, 0, 16, 32))  # a red stripe at the left edge, cropped by a centre crop
    vtab = {"recipe": json.dumps({"augment": "squash"})}  # a checkpoint from before the record existed
    squash = transform_from_record(recorded_preprocessing(vtab, model))(wide)
    crop = transform_from_record(recorded_preprocessing({}, model))(wide)
    assert squash.shape == crop.shape == (3, 32, 32)
    assert squash[0, :, 0].mean() > crop[0, :, 0].mean() + 1  # the stripe survives only the squash


def test_class_names_must_match_the_head(tmp_path):
    assert class_names({"classes": json.dumps(["a", "b"])}, None, 2) == ["a", "b"]
    assert class_names({}, None, 2) is None
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n\n")
    assert class_names({}, str(names), 2) == ["cat", "dog"]
    with pytest.raises(ValueError, match="lists 2 class names but the model has 3"):
        class_names({}, str(names), 3)

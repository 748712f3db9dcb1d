"""eval_transform / train_transform."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from tocom.data import data_config, eval_transform, train_transform


def _half_red_half_blue(w: int = 60, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2, 0] = 255
    arr[:, w // 2 :, 2] = 255
    return Image.fromarray(arr)


def test_eval_transform_follows_pretrained_cfg():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    tf = eval_transform(model)
    resize = next(t for t in tf.transforms if isinstance(t, T.Resize))
    assert resize.size == 248 and resize.interpolation == T.InterpolationMode.BICUBIC  # 224 / crop_pct 0.9
    assert tf(_half_red_half_blue()).shape == (3, 224, 224)
    assert eval_transform(model, img_size=96)(_half_red_half_blue()).shape == (3, 96, 96)
    assert data_config("deit_tiny_patch16_224")["crop_pct"] == 0.9  # by name, nothing downloaded


def test_eval_transform_from_cfg_dict_uses_its_mean_std():
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0}
    x = eval_transform(cfg)(Image.new("RGB", (32, 32), (255, 0, 255)))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 16, 16], torch.tensor([1.0, -1.0, 1.0]), atol=1e-5)


@pytest.mark.parametrize("kind", ["none", "squash"])
def test_squash_resizes_without_cropping_or_augmenting(kind):
    tf = train_transform(kind, 32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x = tf(_half_red_half_blue())  # 2:1 image squashed to 1:1: both halves survive
    assert x.shape == (3, 32, 32)
    assert x[0, :, :14].min() > 0.95 and x[2, :, 18:].min() > 0.95 and x[0, :, 18:].max() < 0.05
    assert torch.equal(tf(_half_red_half_blue()), x)  # deterministic


def test_augmenting_kinds_shape_and_randomness():
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
    for kind in ("deit", "light"):
        tf = train_transform(kind, 24)
        a, b = tf(img), tf(img)
        assert a.shape == b.shape == (3, 24, 24) and not torch.equal(a, b)


def test_train_transform_defaults_from_model_cfg():
    cfg = {"input_size": (3, 48, 48), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    x = train_transform("squash", model_or_cfg=cfg)(Image.new("RGB", (10, 10), (255, 255, 255)))
    assert x.shape == (3, 48, 48) and torch.allclose(x, torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match="unknown train transform kind 'heavy'"):
        train_transform("heavy", 32)

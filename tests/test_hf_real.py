"""Real DeiT-Tiny weights from ../shared converted to Hugging Face (skipped when absent).

On 64 images of the ImageNet sample (timm's eval transform), float32: the HF model's logits equal
timm's at r = 0 to 1e-5 and under tocom at r = 8 and 16 to 1e-4 with the same top-1; with the
shipped plugin folded at 0 -> 16 the two agree to 1e-4; and a ``save_pretrained`` round trip gives
the same logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import tocom
from tocom.compensator import Compensator

pytest.importorskip("transformers")
from tocom.models.hf_convert import from_timm  # noqa: E402  (needs transformers)
from tocom.models.loading import create_model  # noqa: E402

PLUGIN = Path(__file__).resolve().parents[1] / "plugins/deit_tiny_patch16_224.tocom.safetensors"
IMAGES = 64


@pytest.fixture
def deit(shared):
    weights = shared / "weights/deit_tiny_patch16_224.safetensors"
    timm_model = create_model("deit_tiny_patch16_224", weights).eval()
    root = shared / "data/imagenet-sample"
    pairs = [line.split() for line in (root / "labels.txt").read_text().splitlines() if line.strip()][:IMAGES]
    tf = create_transform(**resolve_data_config({}, model=timm_model))
    x = torch.stack([tf(Image.open(root / f).convert("RGB")) for f, _ in pairs])
    return timm_model, from_timm(timm_model), x


def logits(timm_model, hf_model, x):
    with torch.inference_mode():
        return timm_model(x), hf_model(pixel_values=x).logits


@pytest.mark.slow
def test_hf_deit_tiny_matches_timm_compressed_and_compensated(deit, tmp_path):
    timm_model, hf_model, x = deit
    a, b = logits(timm_model, hf_model, x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    tocom.patch(timm_model)
    tocom.patch(hf_model)
    try:
        for r in (8, 16):
            timm_model.r = hf_model.r = r
            a, b = logits(timm_model, hf_model, x)
            assert hf_model.last_state.tokens == timm_model.last_state.tokens
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            assert torch.equal(b.argmax(-1), a.argmax(-1))
        plugin = Compensator.load(PLUGIN)
        assert plugin.spec.family == "timm-vit"  # trained on timm, served here on HF
        for model in (timm_model, hf_model):
            tocom.attach(model, plugin, source=0)
            tocom.set_degree(model, 16)
        a, b = logits(timm_model, hf_model, x)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        with torch.inference_mode():
            uncompensated = tocom.detach(timm_model)(x, r=16)
        assert not torch.allclose(uncompensated, a, atol=1e-2)  # the plugin changed the logits
    finally:
        tocom.unpatch(timm_model)
        tocom.unpatch(hf_model)
    hf_model.save_pretrained(tmp_path)
    from transformers import ViTForImageClassification

    again = ViTForImageClassification.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert torch.equal(again(pixel_values=x).logits, hf_model(pixel_values=x).logits)

"""Real DeiT-Tiny weights and ImageNet images from ../shared (skipped when absent)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from reference_tome import naive_vit_forward
from timm.data import create_transform, resolve_data_config

import tocom
from tocom.models.loading import create_model


def load_deit(shared):
    return create_model("deit_tiny_patch16_224", shared / "weights/deit_tiny_patch16_224.safetensors").eval()


def imagenet_batch(shared, model, limit=None):
    root = shared / "data/imagenet-sample"
    lines = (root / "labels.txt").read_text().split("\n")
    pairs = [line.split() for line in lines if line.strip()][:limit]
    tf = create_transform(**resolve_data_config({}, model=model))
    xs = torch.stack([tf(Image.open(root / f).convert("RGB")) for f, _ in pairs])
    return xs, torch.tensor([int(c) for _, c in pairs])


@pytest.mark.slow
@pytest.mark.parametrize("r", [0, 8, 16])
def test_deit_tiny_matches_original_tome(shared, r):
    model = load_deit(shared)
    x, _ = imagenet_batch(shared, model, limit=4)
    with torch.no_grad():
        ref = naive_vit_forward(model, x, [r] * 12)
        tocom.patch(model)
        model.r = r
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_deit_tiny_top1_at_r0_and_r16(shared):
    model = load_deit(shared)
    x, y = imagenet_batch(shared, model, limit=None)
    tocom.patch(model)
    acc = {}
    with torch.inference_mode():
        for r in (0, 16):
            model.r = r
            pred = torch.cat([model(chunk).argmax(-1) for chunk in x.split(100)])
            acc[r] = (pred == y).float().mean().item()
    print(f"DeiT-Tiny top-1 on imagenet-sample: r=0 {acc[0]:.3f}, r=16 {acc[16]:.3f}")
    assert acc[0] == pytest.approx(0.787, abs=0.01)  # shared/README: 78.7%
    assert 0.6 < acc[16] < acc[0]  # ToMe costs a few points without re-tuning

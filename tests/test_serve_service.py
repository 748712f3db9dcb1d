"""A replica's two sides without Ray: the model worker and the front that drives it."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import tiny_vit
from PIL import Image

from tocom.models.loading import save_model
from tocom.serve.service import ModelWorker, ServeConfig, Service

NAME = "vit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=5)


def png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (20, 30, 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("TOCOM_CACHE", str(tmp_path / "cache"))
    save_model(tiny_vit(), tmp_path / "tiny.safetensors", NAME, KWARGS)
    return ServeConfig(model=NAME, checkpoint=str(tmp_path / "tiny.safetensors"), degrees=(0, 2, 4),
                       slo_ms=1000, max_batch=4, threads=1)


def test_front_with_a_worker_elsewhere_answers_as_the_local_one(config):
    local = Service(config)  # owns its worker
    worker = ModelWorker(config)  # stands for one in another process
    front = Service(config, worker.describe())
    assert front.worker is None and front.table.ms == local.table.ms and front.degrees == [0, 2, 4]
    images = [local.preprocess(png(i)) for i in range(3)]
    expected = local.classify(images, [0.0] * 3, [2] * 3)
    degree = front.choose([0.0] * 3)
    probs, compute_ms, switch_ms, ran = worker.run(torch.stack(images).numpy(), degree)
    assert probs.shape == (3, 5) and compute_ms > 0 and 0 <= switch_ms < compute_ms and ran == degree
    answers = front.answer(probs, degree, compute_ms, [2] * 3, switch_ms)
    assert [a["predictions"] for a in answers] == [e["predictions"] for e in expected]
    assert all(a["degree"] == degree == 0 and a["batch_size"] == 3 for a in answers)  # idle: full accuracy
    assert front.info()["degree"] == 0
    _, compute_ms, switch_ms, ran = worker.run(torch.stack(images).numpy(), 4)  # a switch, timed apart
    assert 0 < switch_ms < compute_ms and ran == 4
    with pytest.raises(RuntimeError, match="runs elsewhere"):
        front.classify(images, [0.0] * 3, [2] * 3)

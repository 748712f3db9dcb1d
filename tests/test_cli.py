"""The bench and visualize commands, and the schedule report, on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_vit
from PIL import Image

import tocom
from tocom.models.loading import save_model

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4)


@pytest.fixture
def tiny_ckpt(tmp_path):
    return save_model(tiny_vit(), tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)


def tocom_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "tocom", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_json_reports_every_schedule(tiny_ckpt):
    out = tocom_cli("bench", "vit_tiny_patch16_224", "--checkpoint", tiny_ckpt, "--r", "0", "3", "2,2,1",
                    "--batch-size", "2", "--rounds", "1", "--json")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["r"] for r in rows] == ["-", "0", "3", "[2, 2, 1]"]
    for row in rows:
        assert {"r", "method", "throughput", "speedup", "gflops", "tokens"} <= set(row)
        assert row["throughput"] > 0
    assert rows[0]["tokens"] == rows[1]["tokens"] == 17
    assert rows[2]["tokens"] == 17 - 4 * 3
    assert rows[2]["gflops"] < rows[1]["gflops"]


def test_visualize_writes_a_picture(tiny_ckpt, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "merge.png"
    tocom_cli("visualize", image, "--model", "vit_tiny_patch16_224", "--checkpoint", tiny_ckpt, "--r", "3",
              "--out", out)
    picture = Image.open(out)
    assert picture.size == (64, 32)  # input and merge map side by side
    merged = np.asarray(picture)[:, 32:]
    assert len(np.unique(merged.reshape(-1, 3), axis=0)) > 2  # groups of different colours, outlined


def test_schedule_report():
    model = tocom.patch(tiny_vit())
    model.r = 3
    report = tocom.schedule_report(model)
    assert report["schedule"] == [3, 3, 3, 3]  # 17 -> 14 -> 11 -> 8 -> 5, never clamped
    assert report["tokens"] == [14, 11, 8, 5]
    assert 0 < report["gflops_ratio"] < 1
    assert tocom.schedule_report(model, 0)["gflops_ratio"] == 1.0

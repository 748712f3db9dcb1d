"""Shared fixtures: tiny random ViTs and the optional ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from tocom.data import shared_dir, write_vtab

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning
# makes them 30x slower; subprocesses inherit the same setting through OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The library finds the shared folder only through TOCOM_SHARED; the tests default it to
# ../shared beside the repo (as laid out on CI machines), so library calls made in tests see it.
os.environ.setdefault("TOCOM_SHARED", str(Path(__file__).resolve().parents[1].parent / "shared"))
SHARED = shared_dir()


def tiny_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    """A small random-weight timm ViT: 32 px images, 8 px patches (16 patches), 4 blocks."""
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4,
                num_classes=5)
    args.update(kwargs)
    return timm.create_model(name, **args).eval()


def random_plugin(model: torch.nn.Module, groups: int = 8, seed: int = 0, method: str = "tome",
                  variant: str = "standard"):
    """A compensator for ``model`` with random (seeded) up-projections, so its deltas are not zero."""
    from tocom.compensator import Compensator

    plugin = Compensator.init_for(model, groups=groups, rank=2, scale=0.1, method=method, variant=variant)
    with torch.no_grad():
        plugin.B.copy_(torch.randn(plugin.B.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return plugin


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real weights and data live in {SHARED}, which is absent (set TOCOM_SHARED)")
    return SHARED


@pytest.fixture(scope="module")
def vtab_task(tmp_path_factory) -> Path:
    """A tiny generated VTAB-1k task (``shape``, 32 px, 12 train / 6 val / 6 test) for fine-tuning."""
    root = tmp_path_factory.mktemp("vtab_task")
    write_vtab("shape", root / "task", seed=0, image_size=32, n_train=12, n_val=6, n_test=6)
    return root / "task"

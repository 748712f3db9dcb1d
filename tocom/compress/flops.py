"""Analytic FLOPs of a ViT under a reduction schedule.

We count multiply-accumulates, the convention of the ToMe, ToCom and PYRA papers (and fvcore):
DeiT-S/16 at 224 px is 4.6 "GFLOPs". Merging happens after attention and before the MLP, so a
block's attention runs on the tokens entering it and its MLP on the tokens leaving it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tocom.compress.schedule import clamp_schedule, ratio_schedule


@dataclass(frozen=True)
class ViTDims:
    """The shape facts FLOPs depend on."""

    depth: int
    embed_dim: int
    mlp_hidden: int
    num_patches: int
    num_prefix: int
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 0
    attn_dim: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix

    @property
    def square_image_size(self) -> int:
        """Side in pixels of the square image whose patch grid is ``num_patches`` (models that do
        not record their input size, such as Hugging Face ViTs, take square images)."""
        return self.patch_size * math.isqrt(self.num_patches)


def block_flops(dims: ViTDims, tokens_in: int, tokens_out: int) -> int:
    """MACs of one block whose attention sees ``tokens_in`` and MLP sees ``tokens_out`` tokens."""
    d, a = dims.embed_dim, dims.attn_dim or dims.embed_dim
    attention = tokens_in * d * 3 * a + 2 * tokens_in * tokens_in * a + tokens_in * a * d
    mlp = 2 * tokens_out * d * dims.mlp_hidden
    return attention + mlp


def model_flops(dims: ViTDims, schedule: Sequence[int]) -> int:
    """MACs of a full forward (patch embedding, blocks, head) for a per-block schedule."""
    effective = clamp_schedule(schedule, dims.num_tokens, dims.num_prefix)
    total = dims.num_patches * dims.patch_size**2 * dims.in_chans * dims.embed_dim
    tokens = dims.num_tokens
    for r in effective:
        total += block_flops(dims, tokens, tokens - r)
        tokens -= r
    return total + dims.embed_dim * dims.num_classes


def gflops(dims: ViTDims, schedule: Sequence[int]) -> float:
    """:func:`model_flops` in units of 1e9."""
    return model_flops(dims, schedule) / 1e9


def schedule_from_flops(dims: ViTDims, flops_ratio: float, tokens_left: int | None = None) -> list[int]:
    """Per-block schedule whose FLOPs are ``flops_ratio`` of the uncompressed model (PYRA Eq. 1).

    The shape of the schedule comes from ``g(x) = (1 - x/L)^(F/f - 1)``; when ``tokens_left`` is
    not given, it is chosen so that the analytic FLOPs ratio comes closest to the target.
    Each block's r is capped at what it can remove so the schedule is never clamped at run time.
    """
    def capped(t: int) -> list[int]:
        raw = ratio_schedule(flops_ratio, dims.depth, dims.num_patches, t)
        return clamp_schedule(raw, dims.num_tokens, dims.num_prefix)

    if tokens_left is not None:
        return capped(tokens_left)
    full = model_flops(dims, [0] * dims.depth)
    candidates = (capped(t) for t in range(dims.num_patches + 1))
    return min(candidates, key=lambda s: abs(model_flops(dims, s) / full - flops_ratio))

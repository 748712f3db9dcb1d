"""Dense mode: merge tokens before a block's MLP and unmerge its output right after.

In dense prediction every patch needs its own output token, so the sequence stays full length
between blocks: attention runs on all ``N`` tokens; ``r`` of them are merged (ToMe) before the MLP,
the MLP runs on ``N - r``, and each original position takes back the output of the token it was
merged into. A block can merge at most ``(N - prefix) // 2`` tokens, whatever the other blocks do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tocom.compress.flops import ViTDims, block_flops
from tocom.compress.tome import MergePlan, merge


def merged_owner(plan: MergePlan, num_tokens: int) -> torch.Tensor:
    """(B, N) index, into the merged sequence of ``N - r`` tokens, of the token holding each position."""
    batch, r = plan.src_idx.shape[0], plan.r
    device = plan.src_idx.device
    pos = torch.arange(num_tokens, device=device, dtype=torch.float64).expand(batch, -1)[..., None]
    dst_pos = (2 * plan.dst_idx + 1).to(torch.float64)  # set B sits at odd positions
    # Each merged token's representative original position: itself, or its B destination.
    rep = merge(plan, pos, mode="amax", src=dst_pos)[..., 0].long()  # (B, N - r)
    owner = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    owner.scatter_(1, rep, torch.arange(num_tokens - r, device=device).expand(batch, -1))
    src_pos = (2 * plan.src_idx[..., 0])  # set A sits at even positions
    owner.scatter_(1, src_pos, owner.gather(1, (2 * plan.dst_idx[..., 0] + 1)))
    return owner


def dense_unmerge(plan: MergePlan, y: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Give every original position the output of its merged token: (B, N - r, C) -> (B, N, C)."""
    owner = merged_owner(plan, num_tokens)
    return y.gather(1, owner[..., None].expand(-1, -1, y.shape[-1]))


def dense_clamp(schedule: Sequence[int], num_tokens: int, num_prefix: int) -> list[int]:
    """Per-block r that dense mode applies: each block merges from the full ``num_tokens``."""
    cap = (num_tokens - num_prefix) // 2
    return [max(0, min(int(r), cap)) for r in schedule]


def dense_model_flops(dims: ViTDims, schedule: Sequence[int]) -> int:
    """MACs of a dense-mode forward: attention on all tokens, each MLP on ``N - r_l`` tokens."""
    n = dims.num_tokens
    total = dims.num_patches * dims.patch_size**2 * dims.in_chans * dims.embed_dim
    for r in dense_clamp(schedule, n, dims.num_prefix):
        total += block_flops(dims, n, n - r)
    return total + dims.embed_dim * dims.num_classes

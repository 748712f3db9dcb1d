"""EViT-style pruning of inattentive tokens as pure tensor functions.

After attention, the patch tokens that the class token attends to least are dropped. With
``fuse=True`` the dropped tokens (one more than r, so the net reduction stays r) are fused into
one token, their average weighted by class attention and size, appended at the end.
Prefix tokens are always kept and stay first; kept patch tokens stay in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrunePlan:
    """Which tokens survive.

    Attributes:
        keep_idx: (B, N - r - fuse, 1) indices into the sequence, prefix first, ascending.
        drop_idx: (B, r + fuse, 1) indices of the pruned tokens (fused when ``fuse``).
        drop_weight: (B, r + fuse, 1) their class attention, for fusing.
        fuse: whether the dropped tokens become one extra token.
    """

    keep_idx: torch.Tensor
    drop_idx: torch.Tensor
    drop_weight: torch.Tensor
    fuse: bool

    @property
    def r(self) -> int:
        return self.drop_idx.shape[1] - int(self.fuse)


def prune_plan(cls_attn: torch.Tensor, r: int, num_prefix: int = 1, fuse: bool = False) -> PrunePlan:
    """Plan dropping the ``r`` patch tokens with the lowest class attention.

    Args:
        cls_attn: (B, N) attention of the class token to every token, averaged over heads.
        r: net tokens to remove.
        num_prefix: leading tokens that are never pruned.
        fuse: drop ``r + 1`` tokens and fuse them into one.

    Returns:
        a :class:`PrunePlan`.
    """
    n = cls_attn.shape[1]
    if r < 0 or r > (n - num_prefix) // 2:
        raise ValueError(f"cannot prune r={r} of {n} tokens with {num_prefix} protected")
    dropped = r + int(fuse and r > 0)
    with torch.no_grad():
        patch_attn = cls_attn[:, num_prefix:]
        order = patch_attn.argsort(dim=-1, descending=True)
        keep = order[:, : patch_attn.shape[1] - dropped].sort(dim=-1)[0] + num_prefix
        drop = order[:, patch_attn.shape[1] - dropped :] + num_prefix
        prefix = torch.arange(num_prefix, device=cls_attn.device).expand(cls_attn.shape[0], -1)
        keep_idx = torch.cat([prefix, keep], dim=1)[..., None]
    drop_weight = cls_attn.gather(1, drop)[..., None]
    return PrunePlan(keep_idx, drop[..., None], drop_weight, fuse and r > 0)


def prune(plan: PrunePlan, x: torch.Tensor, size: torch.Tensor | None, attn_includes_size: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply a plan to tokens and sizes.

    A fused token is the average of the dropped ones weighted by the class attention their
    patches get together. Under proportional attention (``log(size)`` added to the logits) a
    token's attention already is that total; otherwise it is one patch's share, times its size.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) patches per token or None (all ones).
        attn_includes_size: whether the plan's class attention came from proportional attention.

    Returns:
        tokens (B, N - r, C) and sizes (B, N - r, 1) (None stays None when nothing is fused).
    """
    batch, _, c = x.shape
    kept = x.gather(1, plan.keep_idx.expand(-1, -1, c))
    kept_size = None if size is None else size.gather(1, plan.keep_idx)
    if not plan.fuse:
        return kept, kept_size
    dropped = x.gather(1, plan.drop_idx.expand(-1, -1, c))
    drop_size = torch.ones_like(plan.drop_weight) if size is None else size.gather(1, plan.drop_idx)
    weight = plan.drop_weight if attn_includes_size else plan.drop_weight * drop_size
    fused = (dropped * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1e-12)
    if kept_size is None:
        kept_size = torch.ones_like(kept[..., :1])
    return torch.cat([kept, fused], 1), torch.cat([kept_size, drop_size.sum(1, keepdim=True)], 1)


def prune_source(plan: PrunePlan, source: torch.Tensor) -> torch.Tensor:
    """Update the (B, N, N0) token-to-patch map; a fused token owns the union of its parts."""
    n0 = source.shape[-1]
    kept = source.gather(1, plan.keep_idx.expand(-1, -1, n0))
    if not plan.fuse:
        return kept
    fused = source.gather(1, plan.drop_idx.expand(-1, -1, n0)).amax(1, keepdim=True)
    return torch.cat([kept, fused], 1)

"""ToMe: bipartite soft matching as pure tensor functions.

The sequence is split by parity: even positions form set A, odd positions set B. Every A token
finds its most similar B token (cosine similarity of the metric); the ``r`` A tokens with the
best matches are merged into their partners. Prefix tokens (class, distillation, registers)
occupy the first positions: they are never merged away and nothing merges into them.

Output order: prefix tokens in their original order, then the unmerged A tokens in their
original order, then the B tokens. For one class token (and optionally a distillation token)
this is exactly the order of the original ToMe algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# A PYRA-style hook: (sources (B, r, C), their destinations (B, r, C)) -> new sources (B, r, C).
Modulator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MergePlan:
    """Which A tokens merge into which B tokens.

    Attributes:
        unm_idx: (B, Na - r, 1) indices into set A of the tokens kept, ascending.
        src_idx: (B, r, 1) indices into set A of the tokens merged away.
        dst_idx: (B, r, 1) indices into set B of their destinations.
        num_prefix: number of protected leading tokens.
    """

    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    num_prefix: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]


def bipartite_matching(metric: torch.Tensor, r: int, num_prefix: int = 1) -> MergePlan:
    """Plan the merge of ``r`` tokens.

    Args:
        metric: (B, N, C) per-token features to compare (ToMe: keys averaged over heads).
        r: tokens to remove; must already respect ``r <= (N - num_prefix) // 2``.
        num_prefix: leading tokens that are protected.

    Returns:
        a :class:`MergePlan`.
    """
    n = metric.shape[1]
    if r < 0 or r > (n - num_prefix) // 2:
        raise ValueError(f"cannot merge r={r} of {n} tokens with {num_prefix} protected")
    # Plain 3-D slicing and direct kernels: at batch 1 Python dispatch is a good part of the cost.
    with torch.no_grad():
        metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = torch.bmm(a, b.transpose(1, 2))
        # Prefix token i sits in A (even i) at row i // 2, or in B (odd i) at column i // 2.
        scores.narrow(1, 0, (num_prefix + 1) // 2).fill_(-math.inf)
        if num_prefix > 1:
            scores.narrow(2, 0, num_prefix // 2).fill_(-math.inf)

        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True).unsqueeze(-1)
        unm_idx = edge_idx[:, r:].sort(dim=1)[0]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.unsqueeze(-1).gather(dim=1, index=src_idx)
    return MergePlan(unm_idx, src_idx, dst_idx, num_prefix)


def _order(unm: torch.Tensor, dst: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Concatenate kept A and B tokens with the prefix tokens first in their original order."""
    if num_prefix <= 1:
        return torch.cat([unm, dst], dim=1)
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    prefix = torch.stack([unm[:, :pb], dst[:, :pb]], dim=2).flatten(1, 2)
    if pa > pb:
        prefix = torch.cat([prefix, unm[:, pb:pa]], dim=1)
    return torch.cat([prefix, unm[:, pa:], dst[:, pb:]], dim=1)


def merge(plan: MergePlan, x: torch.Tensor, mode: str = "sum", src: torch.Tensor | None = None
          ) -> torch.Tensor:
    """Apply a plan to any per-token tensor.

    Args:
        plan: from :func:`bipartite_matching`.
        x: (B, N, C) tokens.
        mode: how sources combine with their destination: ``"sum"``, ``"mean"`` or ``"amax"``.
        src: (B, r, C) to merge in place of the planned source tokens (e.g. modulated ones);
            None merges the tokens of ``x`` themselves.

    Returns:
        (B, N - r, C).
    """
    a, b = x[:, ::2], x[:, 1::2]
    batch, na, c = a.shape
    r = plan.r
    unm = a.gather(dim=1, index=plan.unm_idx.expand(batch, na - r, c))
    if src is None:
        src = a.gather(dim=1, index=plan.src_idx.expand(batch, r, c))
    b = b.scatter_reduce(1, plan.dst_idx.expand(batch, r, c), src, reduce=mode)
    return _order(unm, b, plan.num_prefix)


def merge_pairs(plan: MergePlan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The r source tokens and their destinations, each (B, r, C), of tokens ``x`` (B, N, C)."""
    batch, _, c = x.shape
    r = plan.r
    src = x[..., ::2, :].gather(dim=-2, index=plan.src_idx.expand(batch, r, c))
    dst = x[..., 1::2, :].gather(dim=-2, index=plan.dst_idx.expand(batch, r, c))
    return src, dst


def modulate_sources(plan: MergePlan, x: torch.Tensor, modulator: Modulator) -> torch.Tensor:
    """Replace the A tokens about to be merged by ``modulator(sources, destinations)``.

    Merging then is ``merge_wavg(plan, x, size, modulator)``, which does the same without this
    full-length copy; this function is for inspecting what a modulator does.

    Args:
        x: (B, N, C) tokens.

    Returns:
        (B, N, C) with only the r source tokens changed.
    """
    batch, _, c = x.shape
    a, b = x[..., ::2, :], x[..., 1::2, :]
    a = a.scatter(-2, plan.src_idx.expand(batch, plan.r, c), modulator(*merge_pairs(plan, x)))
    out = torch.empty_like(x)
    out[..., ::2, :] = a
    out[..., 1::2, :] = b
    return out


def merge_wavg(plan: MergePlan, x: torch.Tensor, size: torch.Tensor | None,
               modulator: Modulator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge as a size-weighted average and track sizes.

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) patches per token, or None for all ones.
        modulator: optional PYRA-style hook; it sees the tokens themselves (not their
            size-weighted sums) and its output replaces the sources before weighting.

    Returns:
        merged tokens (B, N - r, C) and their sizes (B, N - r, 1).
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    # Sizes ride along as one more channel: one gather/scatter/concat per merge instead of two,
    # which is most of the merge's cost at batch 1, where every op is small.
    weighted = torch.cat([x * size, size], dim=-1)
    src = None
    if modulator is not None:
        src_size = size[..., ::2, :].gather(dim=-2, index=plan.src_idx)
        src = torch.cat([modulator(*merge_pairs(plan, x)) * src_size, src_size], dim=-1).to(weighted.dtype)
    merged = merge(plan, weighted, mode="sum", src=src)
    size = merged[:, :, -1:]
    return merged[:, :, :-1] / size, size


def merge_source(plan: MergePlan, source: torch.Tensor) -> torch.Tensor:
    """Update the (B, N, N0) token-to-patch membership map after a merge."""
    return merge(plan, source, mode="amax")

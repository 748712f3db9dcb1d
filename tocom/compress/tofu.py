"""ToFu (Token Fusion): prune early, merge norm-preservingly (MLERP) late, as pure tensor functions.

From Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token Merging"
(WACV 2024), learned from the paper's abstract (its full text was not reachable offline) and from
the ToFu baseline in the PiToMe authors' code (github.com/hchautran/PiToMe, ``algo/tofu``), none of
it copied:

- Matching is ToMe's bipartite soft matching (:func:`tocom.compress.tome.bipartite_matching`).
- Where a block responds non-linearly to interpolated inputs (the early blocks), averaging two
  tokens yields a token the block has never seen; there ToFu *prunes*: each matched source is
  dropped and its destination is kept as it is. Where the response is close to linear (the later
  blocks), ToFu *merges*. The switch: blocks ``l <= L // 2`` (0-based, of ``L``) prune, later
  blocks merge (the split of that reference implementation; the paper's own layer choice could not
  be checked here; see :func:`tofu_merges`).
- MLERP replaces the plain average, which shrinks the norm of dissimilar tokens (a distribution
  shift the next blocks were not trained for): the merged token points like the average and has
  the largest norm among the tokens merged, ``mlerp(x_1..x_k) = mean / |mean| * max_i |x_i|``.

Deviations, and why:

- Sizes. The average inside MLERP is size-weighted (a token standing for 3 patches weighs 3),
  as ToMe's is, so that MLERP and ToMe agree on direction when norms are equal; the max norm is
  over the tokens themselves, unweighted. A pruning step keeps the destination's features but
  adds the source's size and patches to it: the destination stands for them from then on, so
  sizes still sum to the number of patches, proportional attention counts them, and the source
  map (for ``unmerge`` and visualisation) assigns every patch to a token. The reference
  implementation tracks neither.
- Extra per-token values (positions): size-weighted mean in merging blocks, the destination's own
  in pruning blocks (they follow the features' rule, but coordinates have no norm to preserve).
"""

from __future__ import annotations

import torch

from tocom.compress.tome import MergePlan, merge, merge_wavg


def tofu_merges(layer: int, depth: int) -> bool:
    """Whether block ``layer`` (0-based) of ``depth`` merges (MLERP) rather than prunes."""
    if depth < 1 or not 0 <= layer < depth:
        raise ValueError(f"block {layer} does not exist in a model of depth {depth}")
    return layer > depth // 2


def merge_mlerp(plan: MergePlan, x: torch.Tensor, size: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge by MLERP: the size-weighted average rescaled to the largest norm of its members.

    Args:
        x: (B, N, C) tokens; size: (B, N, 1) patches per token, or None for all ones.

    Returns:
        merged tokens (B, N - r, C) and their sizes (B, N - r, 1).
    """
    mean, size = merge_wavg(plan, x, size)
    norm = merge(plan, torch.linalg.vector_norm(x, dim=-1, keepdim=True), mode="amax")
    mean_norm = torch.linalg.vector_norm(mean, dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return mean * (norm / mean_norm), size


def tofu_prune(plan: MergePlan, x: torch.Tensor) -> torch.Tensor:
    """Drop the planned sources and keep their destinations unchanged: (B, N, C) -> (B, N - r, C)."""
    # Zeros summed into each destination: the same gather/scatter/order as a merge, exact values.
    return merge(plan, x, mode="sum", src=x.new_zeros(x.shape[0], plan.r, x.shape[-1]))


def tofu_reduce(plan: MergePlan, x: torch.Tensor, size: torch.Tensor | None, merges: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToFu step: MLERP when ``merges``, else pruning whose destinations take on the sources' sizes.

    Args:
        x: (B, N, C) tokens; size: (B, N, 1) or None for all ones.

    Returns:
        tokens (B, N - r, C) and sizes (B, N - r, 1).
    """
    if merges:
        return merge_mlerp(plan, x, size)
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    return tofu_prune(plan, x), merge(plan, size, mode="sum")

"""PiToMe: energy-ranked token merging as pure tensor functions.

From Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging" (NeurIPS 2024),
learned from the authors' code and README (github.com/hchautran/PiToMe; the paper's full text was
not reachable offline), none of it copied:

- Energy. With ``s_ij`` the cosine similarity of the metric (keys averaged over heads, as for
  ToMe) of patch tokens i and j, a token's energy is ``E_i = mean_j f(s_ij - m)``, where
  ``f(x) = x`` for ``x >= 0`` and ``alpha * (exp(x) - 1)`` below (an ELU): neighbours above the
  margin ``m`` count fully, the others add a bounded penalty. A token in a large cluster of
  similar tokens has high energy and is a merge candidate; an isolated (informative) one has low
  energy and is protected. The mean runs over every patch token, the token itself included.
- Margin. ``m_l = m_0 * (1 - l / L)`` for block ``l`` of ``L``: strict in early blocks, loose
  in late ones. ``m_0 = 0.75`` as in the authors' DeiT patch (``patch/deit.py``, the one they apply
  to timm ``VisionTransformer``s; their MAE patch uses 0.75 too, their AugReg, HF CLIP and BLIP
  patches 0.9). :func:`pitome_margin` and :func:`pitome_block_plan` take any ``base``.
- Energy rule (the paper's matching). Rank the patch tokens by energy (descending). The top
  ``2r`` are split alternately by rank: ranks 0, 2, 4, ... form set A, ranks 1, 3, 5, ... set B;
  each A token merges into its most similar B token, so exactly ``r`` tokens go. All other tokens
  are protected.
- Bipartite variant (the authors' ``use_bsm_pitome``). Sets A and B alternate over *all* patch
  tokens in energy order (ranks 0, 2, ... and 1, 3, ...); each A token finds its most similar B
  token, and the ``r`` A tokens with the most similar partners merge into them, as in ToMe's
  bipartite soft matching. No token is set aside by energy alone: every A token competes, and the
  unmatched ones survive with set B.
- Schedule. The authors' DeiT/timm ViT patch runs the bipartite variant in the first
  ``ceil(L / 2)`` blocks and the energy rule in the rest; :func:`pitome_block_plan` does the
  same by default, and ``bsm_blocks=0`` gives the energy rule in every block.
- Prefix tokens (class, distillation, registers) take no part: no energy, never merged, nothing
  merges into them (the authors' code strips the class token the same way).
- Merge: the size-weighted average, sizes tracked (the authors' timm code does the same).

Deviations, and why:

- Output order: prefix tokens first, then every surviving patch token in its original order
  (the authors' code puts the protected or unmerged A tokens in energy order before the B
  tokens). Order does not change what a ViT computes, and original order keeps the result easy
  to read and test.
- Ties in energy or similarity go to the lower index (stable sorts), where the authors' unstable
  ``argsort`` leaves them unspecified.
- ``r`` is capped at half the patch tokens in both variants, as for ToMe (the authors' bipartite
  branch would accept up to the size of set A).
- Proportional attention is the caller's choice (tocom's ``prop_attn``, on by default), as for
  ToMe; the authors' timm code runs without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PITOME_MARGIN = 0.75  # m_0, the margin of the first block (the authors' DeiT/timm ViT value)
PITOME_ALPHA = 1.0  # ELU slope below the margin


@dataclass(frozen=True)
class PitomePlan:
    """Which tokens merge into which, as indices into the full sequence.

    Attributes:
        keep_idx: (B, N - r, 1) surviving tokens in output order: prefix, then patch tokens ascending.
        src_idx: (B, r, 1) the set-A tokens merged away.
        dst_idx: (B, r, 1) the set-B token each of them merges into.
    """

    keep_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]


def pitome_margin(layer: int, depth: int, base: float = PITOME_MARGIN) -> float:
    """The margin ``base * (1 - layer / depth)`` of block ``layer`` (0-based) of ``depth``."""
    _check_block(layer, depth)
    return base * (1.0 - layer / depth)


def pitome_uses_bipartite(layer: int, depth: int, bsm_blocks: int | None = None) -> bool:
    """Whether block ``layer`` (0-based) of ``depth`` runs the bipartite variant: the first
    ``bsm_blocks`` blocks do, ``ceil(depth / 2)`` when None (the authors' ViT setting); 0 gives the
    energy rule in every block."""
    _check_block(layer, depth)
    if bsm_blocks is None:
        bsm_blocks = math.ceil(depth / 2)
    if bsm_blocks < 0:
        raise ValueError(f"bsm_blocks={bsm_blocks} is negative: pass 0 (energy rule everywhere) or more")
    return layer < bsm_blocks


def _check_block(layer: int, depth: int) -> None:
    if depth < 1 or not 0 <= layer < depth:
        raise ValueError(f"block {layer} does not exist in a model of depth {depth}")


def energy_score(metric: torch.Tensor, margin: float, alpha: float = PITOME_ALPHA) -> torch.Tensor:
    """Energy of every token: metric (B, N, C) -> (B, N), the mean over j of ELU(cos_ij - margin)."""
    return _energy(_cosine(metric), margin, alpha)


def _cosine(metric: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(metric, dim=-1)
    return unit @ unit.transpose(1, 2)


def _energy(sim: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1)


def _best_match(sim: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each A token its most similar B token: sim (B, P, P), a (B, Ra), b (B, Rb) patch
    indices -> (similarity (B, Ra), position in b (B, Ra))."""
    rows = sim.gather(1, a[..., None].expand(-1, -1, sim.shape[2]))  # (B, Ra, P)
    return rows.gather(2, b[:, None].expand(-1, a.shape[1], -1)).max(dim=-1)


def pitome_matching(metric: torch.Tensor, r: int, num_prefix: int = 1, margin: float = PITOME_MARGIN,
                    alpha: float = PITOME_ALPHA, bipartite: bool = False) -> PitomePlan:
    """Plan the merge of ``r`` tokens by energy.

    Args:
        metric: (B, N, C) per-token features to compare (keys averaged over heads).
        r: tokens to remove; must respect ``r <= (N - num_prefix) // 2``.
        num_prefix: leading tokens that are protected and take no part.
        margin, alpha: the energy's margin (see :func:`pitome_margin`) and ELU slope.
        bipartite: the early-block variant (A and B alternate over all patch tokens in energy
            order, the r most similar pairs merge) instead of the energy rule (top 2r only).

    Returns:
        a :class:`PitomePlan`.
    """
    batch, n, _ = metric.shape
    if r < 0 or r > (n - num_prefix) // 2:
        raise ValueError(f"cannot merge r={r} of {n} tokens with {num_prefix} protected")
    prefix = torch.arange(num_prefix, device=metric.device).expand(batch, -1)
    if r == 0:
        empty = prefix.new_zeros(batch, 0, 1)
        keep = torch.arange(n, device=metric.device).expand(batch, -1)[..., None]
        return PitomePlan(keep, empty, empty)
    with torch.no_grad():
        sim = _cosine(metric[:, num_prefix:])  # (B, P, P) over the patch tokens
        ranked = _energy(sim, margin, alpha).sort(dim=-1, descending=True, stable=True)[1]
        if bipartite:
            a, b = ranked[:, ::2], ranked[:, 1::2]
            score, choice = _best_match(sim, a, b)
            by_score = score.sort(dim=-1, descending=True, stable=True)[1]
            src, choice = a.gather(1, by_score[:, :r]), choice.gather(1, by_score[:, :r])
            survivors = torch.cat([a.gather(1, by_score[:, r:]), b], dim=1)
        else:
            src, b = ranked[:, : 2 * r : 2], ranked[:, 1 : 2 * r : 2]  # (B, r) each
            choice = _best_match(sim, src, b)[1]
            survivors = torch.cat([ranked[:, 2 * r :], b], dim=1)  # the protected tokens and set B
        dst = b.gather(1, choice)
        survivors = survivors.sort(dim=1)[0] + num_prefix
        keep_idx = torch.cat([prefix, survivors], dim=1)[..., None]
    return PitomePlan(keep_idx, (src + num_prefix)[..., None], (dst + num_prefix)[..., None])


def pitome_block_plan(metric: torch.Tensor, r: int, num_prefix: int, layer: int, depth: int,
                      base: float = PITOME_MARGIN, bsm_blocks: int | None = None) -> PitomePlan:
    """Plan block ``layer`` (0-based) of ``depth`` as the authors run ViTs: the margin
    ``base * (1 - layer / depth)`` and, in the first ``bsm_blocks`` blocks (``ceil(depth / 2)``
    when None; 0 for the energy rule everywhere), the bipartite variant.

    Args:
        metric: (B, N, C) per-token features; r, num_prefix: as for :func:`pitome_matching`.

    Returns:
        a :class:`PitomePlan` (keep (B, N - r, 1), src and dst (B, r, 1)).
    """
    return pitome_matching(metric, r, num_prefix, margin=pitome_margin(layer, depth, base),
                           bipartite=pitome_uses_bipartite(layer, depth, bsm_blocks))


def pitome_merge(plan: PitomePlan, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Apply a plan to any per-token tensor: x (B, N, C) -> (B, N - r, C); sources combine into
    their destination by ``mode`` (``"sum"``, ``"mean"`` or ``"amax"``)."""
    c = x.shape[-1]
    src = x.gather(1, plan.src_idx.expand(-1, -1, c))
    x = x.scatter_reduce(1, plan.dst_idx.expand(-1, -1, c), src, reduce=mode)
    return x.gather(1, plan.keep_idx.expand(-1, -1, c))


def pitome_wavg(plan: PitomePlan, x: torch.Tensor, size: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge as a size-weighted average and track sizes.

    Args:
        x: (B, N, C) tokens; size: (B, N, 1) patches per token, or None for all ones.

    Returns:
        merged tokens (B, N - r, C) and their sizes (B, N - r, 1).
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    merged = pitome_merge(plan, torch.cat([x * size, size], dim=-1))
    size = merged[..., -1:]
    return merged[..., :-1] / size, size


def pitome_source(plan: PitomePlan, source: torch.Tensor) -> torch.Tensor:
    """Update the (B, N, N0) token-to-patch membership map after a merge."""
    return pitome_merge(plan, source, mode="amax")

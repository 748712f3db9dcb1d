"""Block and attention forwards that reduce tokens between attention and MLP.

These mirror timm's ``Block.forward`` and ``Attention.forward`` (layer scale, q/k norm, scale
norm, gating and drop-path included) and call the module slots (``attn.qkv``, ``norm2``,
``mlp``, ...) as modules, so adapters that replace those slots keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tocom.compress import (
    bipartite_matching,
    dense_unmerge,
    merge_source,
    merge_wavg,
    pitome_block_plan,
    pitome_source,
    pitome_wavg,
    prune,
    prune_plan,
    prune_source,
    tofu_merges,
    tofu_prune,
    tofu_reduce,
)
from tocom.models.sdpa import proportional_sdpa, size_bias

# tome: ToMe merging; evit: EViT pruning; pitome: PiToMe energy-ranked merging; tofu: ToFu (prune
# early, MLERP merge late). See tocom.compress for each rule and its paper.
COMPRESSION_METHODS = ("tome", "evit", "pitome", "tofu")
DEPTH_AWARE = ("pitome", "tofu")  # methods whose rule depends on the block's relative depth
MODES = ("standard", "dense")

# Per-forward low-rank additions to q and v (a live compensator): (layer, normalised tokens
# (B, N, C)) -> (dq, dv), each (B, N, attn_dim). Passed explicitly, never stored on a module.
QVDelta = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TokenState:
    """Per-forward token bookkeeping, created inside each forward and passed along explicitly.

    Attributes:
        size: (B, N, 1) patches per token, None while nothing has been reduced.
        source: (B, N, N0) token-to-original-position map when tracing, else None.
        num_prefix: protected leading tokens.
        schedule: effective per-block r of this forward.
        tokens: sequence length after each block.
        qv_delta: low-rank q/v additions of this forward (a live compensator), or None.
    """

    size: torch.Tensor | None
    source: torch.Tensor | None
    num_prefix: int
    schedule: list[int]
    tokens: list[int] = field(default_factory=list)
    qv_delta: QVDelta | None = None


@dataclass(frozen=True)
class CompressionConfig:
    """How a patched model reduces tokens."""

    method: str = "tome"
    prop_attn: bool = True
    trace_source: bool = False
    fuse: bool = False  # EViT: fuse pruned tokens into one
    mode: str = "standard"  # dense: merge before each MLP, unmerge after it (full-length outputs)
    depth: int = 0  # blocks of the patched model (PiToMe's margin and ToFu's switch follow l / depth)


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, skipping the call of a plain ``nn.Identity`` (layer scale, drop-path, q/k norm
    switched off): at batch 1 a module call costs about what a small kernel does."""
    return x if type(module) is nn.Identity else module(x)


def attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, need: str | None,
              qv: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``Attention`` with proportional attention and a reduction metric.

    Args:
        attn: a timm ``Attention`` module.
        x: (B, N, C) normalised tokens.
        size: (B, N, 1) token sizes; adds ``log(size)`` of each key to the logits when given (as a
            float mask or an extra q/k channel: :mod:`tocom.models.sdpa`).
        need: ``"keys"`` (ToMe metric: keys averaged over heads, (B, N, head_dim)),
            ``"cls_attn"`` (EViT metric: class-token attention averaged over heads, (B, N)) or None.
        qv: (dq, dv), each (B, N, attn_dim), added to q and v before the q/k norms, or None.

    Returns:
        attention output (B, N, C) and the metric (or None).
    """
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if qv is not None:
        heads = (batch, n, attn.num_heads, attn.head_dim)
        q = q + qv[0].reshape(heads).transpose(1, 2).to(q.dtype)
        v = v + qv[1].reshape(heads).transpose(1, 2).to(v.dtype)
    q, k = _call(attn.q_norm, q), _call(attn.k_norm, k)
    out = proportional_sdpa(q, k, v, size, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    metric = None
    if need == "keys":
        metric = k.mean(1)
    elif need == "cls_attn":
        # Only the class token's row: (B, H, 1, N), never the full N x N matrix.
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        if size is not None:
            logits = logits + size_bias(size, None, q.dtype)
        metric = logits.softmax(dim=-1).mean(1)[:, 0]
    out = out.transpose(1, 2).reshape(batch, n, -1)
    out = _call(attn.norm, out)
    if gate is not None:
        out = out * gate
    out = attn.proj(out)
    return (attn.proj_drop(out) if attn.training else out), metric


def block_forward(blk: nn.Module, x: torch.Tensor, r: int, size: torch.Tensor | None,
                  source: torch.Tensor | None, num_prefix: int, config: CompressionConfig,
                  layer: int = 0, qv_delta: QVDelta | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One timm ``Block`` that removes ``r`` tokens after attention.

    In ``config.mode == "dense"`` the block merges ``r`` tokens before its MLP and gives each
    original position the MLP output of its merged token: the output stays ``(B, N, C)`` and
    ``size``/``source`` pass through unchanged (every token still stands for its own patch).

    Args:
        x: (B, N, C) tokens; size: (B, N, 1) or None; source: (B, N, N0) or None.
        r: tokens to remove here (already clamped).
        layer, qv_delta: this block's index and the forward's live q/v additions (or None).

    Returns:
        tokens (B, N - r, C), sizes (B, N - r, 1) or None, source (B, N - r, N0) or None.
    """
    need = metric_for(config, r)
    attn_size = size if config.prop_attn else None
    h = blk.norm1(x)
    out, metric = attention(blk.attn, h, attn_size, need, None if qv_delta is None else qv_delta(layer, h))
    x = x + _call(blk.drop_path1, _call(blk.ls1, out))
    # Free the block's temporaries as timm's own forward does: holding them through the MLP made
    # glibc hand memory back and re-fault it every forward (~10% slower at batch 8, r = 0).
    del h, out
    if r > 0 and config.mode == "dense":
        plan = bipartite_matching(metric, r, num_prefix)
        merged, _ = merge_wavg(plan, x, size, getattr(blk, "merge_modulator", None))
        y = _call(blk.drop_path2, _call(blk.ls2, blk.mlp(blk.norm2(merged))))  # the MLP on N - r tokens
        return x + dense_unmerge(plan, y, x.shape[1]), size, source
    # A PYRA-style modulator (tocom.pyra) rewrites the sources inside a ToMe merge.
    x, size, source, _ = reduce_tokens(x, metric, r, size, source, num_prefix, config, layer,
                                       getattr(blk, "merge_modulator", None))
    x = x + _call(blk.drop_path2, _call(blk.ls2, blk.mlp(blk.norm2(x))))
    return x, size, source


def metric_for(config: CompressionConfig, r: int) -> str | None:
    """The metric a block removing ``r`` tokens needs from attention: ``"cls_attn"`` for EViT,
    ``"keys"`` for the merging rules (ToMe, PiToMe, ToFu), None when it removes nothing."""
    return None if r == 0 else ("cls_attn" if config.method == "evit" else "keys")


def reduce_tokens(x: torch.Tensor, metric: torch.Tensor | None, r: int, size: torch.Tensor | None,
                  source: torch.Tensor | None, num_prefix: int, config: CompressionConfig,
                  layer: int | None = None, modulator=None, extra: torch.Tensor | None = None):
    """Remove ``r`` tokens by the configured method (standard mode); every family calls this.

    Args:
        x: (B, N, C) tokens; size (B, N, 1) or None; source (B, N, N0) or None.
        metric: what :func:`metric_for` asked attention for: keys (B, N, head_dim) or class
            attention (B, N).
        layer: this block's index (0-based); PiToMe and ToFu need it (with ``config.depth``).
        modulator: a PYRA merge modulator (ToMe only) or None.
        extra: (B, N, E) per-token values (e.g. positions) reduced like the features: a size-weighted
            mean over a merge (EViT's fused token: weighted like its features; a ToFu pruning step:
            the destination's own), or None.

    Returns:
        ``(x, size, source, extra)`` each with N - r tokens (None stays None).
    """
    if r == 0:
        return x, size, source, extra
    method = config.method
    if method in DEPTH_AWARE and (layer is None or config.depth < 1):
        raise ValueError(f"{method} follows the block's depth: pass layer= to the reduction and patch "
                         "with tocom.patch, which records the model's depth")
    if method == "evit":
        plan = prune_plan(metric, r, num_prefix, fuse=config.fuse)
        if source is not None:
            source = prune_source(plan, source)
        # Under proportional attention the class attention already counts each token's size.
        if extra is not None:
            extra = prune(plan, extra, size, attn_includes_size=config.prop_attn)[0]
        x, size = prune(plan, x, size, attn_includes_size=config.prop_attn)
    elif method == "pitome":
        plan = pitome_block_plan(metric, r, num_prefix, layer, config.depth)
        if source is not None:
            source = pitome_source(plan, source)
        if extra is not None:
            extra = pitome_wavg(plan, extra, size)[0]
        x, size = pitome_wavg(plan, x, size)
    else:  # tome, tofu: bipartite soft matching
        plan = bipartite_matching(metric, r, num_prefix)
        if source is not None:
            source = merge_source(plan, source)
        if method == "tome":
            if extra is not None:
                extra = merge_wavg(plan, extra, size)[0]
            x, size = merge_wavg(plan, x, size, modulator)
        else:
            merges = tofu_merges(layer, config.depth)
            if extra is not None:  # positions: averaged where features merge, the destination's otherwise
                extra = merge_wavg(plan, extra, size)[0] if merges else tofu_prune(plan, extra)
            x, size = tofu_reduce(plan, x, size, merges)
    return x, size, source, extra

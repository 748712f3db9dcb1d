"""Adapter for timm ``VisionTransformer`` (DeiT distilled, registers, layer scale, q/k norm).

:func:`patch` swaps the model's class for a subclass whose ``forward_features`` and
``forward_head`` run :func:`tocom.models.blocks.block_forward`; :func:`unpatch` swaps it back.
No weights are touched, so unpatching restores bit-identical outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from tocom.compress import (
    Schedule,
    ViTDims,
    clamp_schedule,
    dense_clamp,
    dense_model_flops,
    gflops,
    initial_source,
    resolve_schedule,
    tokens_per_layer,
)
from tocom.models.blocks import METHODS, MODES, CompressionConfig, TokenState, block_forward

SUPPORTED = "timm VisionTransformer models (ViT, DeiT, DeiT distilled, ViTs with registers) built from Block"
_PATCHED_CLASSES: dict[type, type] = {}


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer) or not hasattr(model, "blocks"):
        raise TypeError(f"tocom supports {SUPPORTED}; got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or not isinstance(blk.attn, Attention):
            raise TypeError(
                f"block {i} is {type(blk).__name__} with {type(blk.attn).__name__} attention; "
                f"tocom supports {SUPPORTED} (timm Block + Attention)"
            )


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has been applied."""
    return hasattr(model, "_tocom")


def dims_of(model: nn.Module) -> ViTDims:
    """Shape facts of a timm ViT for FLOPs and schedules."""
    blk = model.blocks[0]
    patch = model.patch_embed.patch_size
    return ViTDims(
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        mlp_hidden=blk.mlp.fc1.out_features if hasattr(blk.mlp, "fc1") else 4 * model.embed_dim,
        num_patches=model.patch_embed.num_patches,
        num_prefix=model.num_prefix_tokens,
        patch_size=patch[0] if isinstance(patch, tuple) else patch,
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=getattr(model, "num_classes", 0),
        attn_dim=blk.attn.num_heads * blk.attn.head_dim,
    )


def schedule_report(model: nn.Module, r: Schedule | None = None, mode: str | None = None) -> dict[str, Any]:
    """Tokens per block and analytic GFLOPs of a timm ViT at schedule ``r`` (default: ``model.r``).

    ``mode`` (default: the patched model's, else ``"standard"``) decides the cost: in ``"dense"``
    mode attention runs on every token and each MLP on ``N - r`` of them.

    Returns:
        ``{"schedule": effective per-block r, "tokens": length after each block (its attention's
        length in the next block), "mlp_tokens": tokens each MLP runs on, "gflops": per image,
        "gflops_ratio": vs r = 0, "mode"}``.
    """
    dims = dims_of(model)
    r = (model.r if is_patched(model) else 0) if r is None else r
    mode = (model._tocom.mode if is_patched(model) else "standard") if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n, p = dims.num_tokens, dims.num_prefix
    full = gflops(dims, [0] * dims.depth)
    if mode == "dense":
        schedule = dense_clamp(resolve_schedule(r, dims.depth), n, p)
        cost = dense_model_flops(dims, schedule) / 1e9
        return {"schedule": schedule, "tokens": [n] * dims.depth, "mlp_tokens": [n - k for k in schedule],
                "gflops": cost, "gflops_ratio": cost / full, "mode": mode}
    schedule = clamp_schedule(resolve_schedule(r, dims.depth), n, p)
    tokens = tokens_per_layer(schedule, n, p)
    return {"schedule": schedule, "tokens": tokens, "mlp_tokens": tokens, "gflops": gflops(dims, schedule),
            "gflops_ratio": gflops(dims, schedule) / full, "mode": mode}


class CompressedViTMixin:
    """Methods shared by every patched ViT class."""

    @property
    def r(self) -> Schedule:
        """The reduction schedule: int, per-block list, or ``(r, inflection)``."""
        return self._tocom_r

    @r.setter
    def r(self, value: Schedule) -> None:
        resolve_schedule(value, len(self.blocks))  # validate now, not at the next forward
        self._tocom_r = value

    def effective_schedule(self, num_tokens: int | None = None) -> list[int]:
        """Per-block r actually applied for a sequence of ``num_tokens`` (default: the model's)."""
        n = self.patch_embed.num_patches + self.num_prefix_tokens if num_tokens is None else num_tokens
        clamp = dense_clamp if self._tocom.mode == "dense" else clamp_schedule
        return clamp(resolve_schedule(self.r, len(self.blocks)), n, self.num_prefix_tokens)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenState]:
        """Images (B, 3, H, W) -> final normalised tokens (B, N_L, C) and their :class:`TokenState`."""
        config: CompressionConfig = self._tocom
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        batch, n, _ = x.shape
        schedule = self.effective_schedule(n)
        source = initial_source(batch, n, x.device, x.dtype) if config.trace_source else None
        state = TokenState(None, source, self.num_prefix_tokens, schedule)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for blk, r in zip(self.blocks, schedule):
            args = (blk, x, r, state.size, state.source, state.num_prefix, config)
            if use_ckpt:
                x, state.size, state.source = checkpoint(block_forward, *args, use_reentrant=False)
            else:
                x, state.size, state.source = block_forward(*args)
            state.tokens.append(x.shape[1])
        return self.norm(x), state

    def forward_features(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False
                         ) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, N_L, C); the state is kept in ``self.last_state``."""
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks do not survive token reduction; unpatch the model to use them")
        x, state = self.forward_tokens(x)
        # Read-only record for visualisation and forward_head; nothing in the forward consumes it.
        self.last_state = state
        return x

    def pool(self, x: torch.Tensor, pool_type: str | None = None, size: torch.Tensor | None = None
             ) -> torch.Tensor:
        """timm pooling with average pooling weighted by token size. x: (B, N, C) -> (B, C)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if size is None or self.attn_pool is not None or pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        mean = (x * size).sum(1) / size.sum(1)
        return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)

    def _sizes_for(self, x: torch.Tensor) -> torch.Tensor | None:
        state = getattr(self, "last_state", None)
        if state is None or state.size is None or state.size.shape[:2] != x.shape[:2]:
            return None
        return state.size

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Tokens (B, N, C) -> logits (B, classes) or pooled features (B, C)."""
        if self.global_pool not in ("avg", "avgmax") or self.attn_pool is not None:
            return super().forward_head(x, pre_logits=pre_logits)
        size = self._sizes_for(x) if size is None else size
        x = self.head_drop(self.fc_norm(self.pool(x, size=size)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks do not survive token reduction; unpatch the model to use them")
        x, state = self.forward_tokens(x)
        self.last_state = state
        if self.global_pool in ("avg", "avgmax") and self.attn_pool is None:
            return self.forward_head(x, size=state.size)
        return self.forward_head(x)


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Compressed{cls.__name__}", (CompressedViTMixin, cls), {})
    return _PATCHED_CLASSES[cls]


def patch(model: nn.Module, method: str = "tome", *, prop_attn: bool = True,
          trace_source: bool = False, fuse: bool = False, mode: str = "standard") -> nn.Module:
    """Make a timm ViT reduce tokens; set the degree with ``model.r = ...`` (default 0).

    Args:
        model: a timm ``VisionTransformer`` (patched in place).
        method: ``"tome"`` (merge similar tokens) or ``"evit"`` (prune inattentive ones).
        mode: ``"standard"`` (tokens removed stay removed) or ``"dense"`` (ToMe only: each block
            merges r of its full-length input before the MLP and unmerges the MLP's output, so
            every patch keeps its own output token, for dense prediction).
        prop_attn: add ``log(size)`` of each key to the attention logits.
        trace_source: keep the token-to-patch map in ``model.last_state.source``.
        fuse: EViT only: fuse pruned tokens into one.

    Returns:
        the same model. Patching a patched model only updates these options.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "dense" and method != "tome":
        raise ValueError(f"dense mode merges tokens and unmerges them after each MLP; {method} prunes "
                         "tokens, which cannot be unmerged: use method='tome'")
    config = CompressionConfig(method, prop_attn, trace_source, fuse, mode)
    if is_patched(model):
        model._tocom = config
        return model
    _check_supported(model)
    if method == "evit" and model.cls_token is None:
        raise ValueError("EViT ranks tokens by class-token attention; this model has no class token")
    model.__class__ = _patched_class(type(model))
    model._tocom = config
    model._tocom_r = 0
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the model's class, and so its outputs, are restored exactly."""
    if not is_patched(model):
        return model
    model.__class__ = next(c for c in type(model).__mro__[1:] if c is not CompressedViTMixin
                           and not issubclass(c, CompressedViTMixin))
    for name in ("_tocom", "_tocom_r", "last_state"):
        model.__dict__.pop(name, None)
    return model

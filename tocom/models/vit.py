"""Adapter for timm ``VisionTransformer`` (DeiT distilled, registers, layer scale, q/k norm).

:func:`patch` swaps the model's class for a subclass whose ``forward_features`` and
``forward_head`` run :func:`tocom.models.blocks.block_forward`; :func:`unpatch` swaps it back.
No weights are touched, so unpatching restores bit-identical outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
from tocom.models.blocks import (
    COMPRESSION_METHODS,
    MODES,
    CompressionConfig,
    QVDelta,
    TokenState,
    block_forward,
)
from tocom.models.lock import StateLock

SUPPORTED = "timm VisionTransformer models (ViT, DeiT, DeiT distilled, ViTs with registers) built from Block"
_PATCHED_CLASSES: dict[type, type] = {}
_HOOKS = "_tocom_plugin"


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


@dataclass
class PluginHooks:
    """What a plugin layer above hangs on a patched model (this layer never imports it).

    Attributes:
        method: the compression method the plugin was trained for; re-patching may not change it.
        mode: the compression mode (standard, dense) it was distilled in; likewise fixed.
        at_degree: for a per-call degree, the live q/v additions that turn the weights as folded
            now into the weights of that degree (None when none are needed).
        detach: undoes the plugin's folded delta; :func:`unpatch` calls it first.
    """

    method: str
    at_degree: Callable[[nn.Module, Schedule], QVDelta | None]
    detach: Callable[[nn.Module], None]
    mode: str = "standard"


def plugin_hooks(model: nn.Module) -> PluginHooks | None:
    """The hooks a plugin registered on ``model``, or None."""
    return model.__dict__.get(_HOOKS)


def set_plugin_hooks(model: nn.Module, hooks: PluginHooks | None) -> None:
    """Register (or with None, remove) a plugin's hooks on a patched model."""
    if hooks is None:
        model.__dict__.pop(_HOOKS, None)
    else:
        model.__dict__[_HOOKS] = hooks


def state_lock(model: nn.Module) -> StateLock:
    """The lock whose exclusive side every change of a patched model's degree or weights takes."""
    return model.__dict__["_tocom_lock"]


class CompressedViTMixin:
    """Methods shared by every patched ViT class."""

    @property
    def r(self) -> Schedule:
        """The reduction schedule: int, per-block list, or ``(r, inflection)``."""
        return self._tocom_r

    @r.setter
    def r(self, value: Schedule) -> None:
        resolve_schedule(value, len(self.blocks))  # validate now, not at the next forward
        with state_lock(self).exclusive():  # never between two blocks of a running forward
            self._tocom_r = value

    def effective_schedule(self, num_tokens: int | None = None, r: Schedule | None = None) -> list[int]:
        """Per-block r actually applied for ``num_tokens`` (default: the model's) at ``r`` (default:
        ``self.r``)."""
        n = self.patch_embed.num_patches + self.num_prefix_tokens if num_tokens is None else num_tokens
        r = self.r if r is None else r
        clamp = dense_clamp if self._tocom.mode == "dense" else clamp_schedule
        return clamp(resolve_schedule(r, len(self.blocks)), n, self.num_prefix_tokens)

    def forward_tokens(self, x: torch.Tensor, r: Schedule | None = None, qv_delta: QVDelta | None = None
                       ) -> tuple[torch.Tensor, TokenState]:
        """Images (B, 3, H, W) -> final normalised tokens (B, N_L, C) and their :class:`TokenState`.

        Args:
            r: a degree for this call only (default: ``self.r``); no shared state changes. With a
                plugin attached the call also gets the plugin's delta for that degree, on the fly.
            qv_delta: live q/v additions for this call (a plugin in training).
        """
        if torch.compiler.is_compiling():  # a traced graph holds no lock; see docs/export.md
            return self._forward_tokens(x, r, qv_delta)
        with state_lock(self).shared():  # degree and weights stay put until this forward ends
            return self._forward_tokens(x, r, qv_delta)

    def _forward_tokens(self, x: torch.Tensor, r: Schedule | None, qv_delta: QVDelta | None
                        ) -> tuple[torch.Tensor, TokenState]:
        config: CompressionConfig = self._tocom
        hooks = plugin_hooks(self)
        if r is not None and hooks is not None:
            extra = hooks.at_degree(self, r)
            if extra is not None and qv_delta is not None:
                raise ValueError("a per-call degree on a model with an attached plugin cannot take another "
                                 "qv_delta; detach the plugin first")
            qv_delta = extra if extra is not None else qv_delta
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        batch, n, _ = x.shape
        schedule = self.effective_schedule(n, r)
        source = initial_source(batch, n, x.device, x.dtype) if config.trace_source else None
        state = TokenState(None, source, self.num_prefix_tokens, schedule, qv_delta=qv_delta)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for layer, (blk, r_here) in enumerate(zip(self.blocks, schedule)):
            args = (blk, x, r_here, state.size, state.source, state.num_prefix, config, layer, qv_delta)
            if use_ckpt:
                x, state.size, state.source = checkpoint(block_forward, *args, use_reentrant=False)
            else:
                x, state.size, state.source = block_forward(*args)
            state.tokens.append(x.shape[1])
        return self.norm(x), state

    def forward_features(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False, *,
                         r: Schedule | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, N_L, C). For their sizes use :meth:`forward_tokens`;
        ``self.last_state`` records the latest forward (of any thread) for inspection only."""
        _refuse_masks(attn_mask, is_causal)
        x, state = self.forward_tokens(x, r)
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

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Tokens (B, N, C) -> logits (B, classes) or pooled features (B, C).

        ``size`` (B, N, 1) are the tokens' sizes from :meth:`forward_tokens`; average pooling of
        reduced tokens needs them.
        """
        if self.global_pool not in ("avg", "avgmax") or self.attn_pool is not None:
            return super().forward_head(x, pre_logits=pre_logits)
        if size is None and x.shape[1] < self.patch_embed.num_patches + self.num_prefix_tokens:
            raise ValueError(
                f"average pooling of {x.shape[1]} reduced tokens needs their sizes: call "
                "x, state = model.forward_tokens(images) and model.forward_head(x, size=state.size)"
            )
        x = self.head_drop(self.fc_norm(self.pool(x, size=size)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False, *,
                r: Schedule | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> logits; ``r`` runs this call alone at that degree."""
        _refuse_masks(attn_mask, is_causal)
        x, state = self.forward_tokens(x, r)
        self.last_state = state
        return self.forward_head(x, size=state.size)


def _refuse_masks(attn_mask: Any, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attention masks do not survive token reduction; unpatch the model to use them")


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
        the same model. Patching a patched model updates these options, with the same checks.
    """
    if method not in COMPRESSION_METHODS:
        raise ValueError(f"method must be one of {COMPRESSION_METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "dense" and method != "tome":
        raise ValueError(f"dense mode merges tokens and unmerges them after each MLP; {method} prunes "
                         "tokens, which cannot be unmerged: use method='tome'")
    if not is_patched(model):
        _check_supported(model)
    if method == "evit" and model.cls_token is None:
        raise ValueError("EViT ranks tokens by class-token attention; this model has no class token")
    if method != "tome" and any(hasattr(blk, "merge_modulator") for blk in model.blocks):
        raise ValueError("this model has PYRA modulators, which only act on ToMe merges; "
                         "call tocom.pyra.remove_pyra(model) before patching it for EViT")
    config = CompressionConfig(method, prop_attn, trace_source, fuse, mode)
    if is_patched(model):
        hooks = plugin_hooks(model)
        if hooks is not None and hooks.method != method:
            raise ValueError(f"a {hooks.method} compensator is attached to this model; "
                             f"tocom.detach(model) before patching it for {method}")
        if hooks is not None and hooks.mode != mode:
            raise ValueError(f"a compensator distilled in {hooks.mode} mode is attached to this model; "
                             f"tocom.detach(model) before patching it in {mode} mode")
        with state_lock(model).exclusive():
            model._tocom = config
        return model
    model.__class__ = _patched_class(type(model))
    model._tocom_lock = StateLock()
    model._tocom = config
    model._tocom_r = 0
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (detaching any plugin first): class, weights and outputs are restored."""
    if not is_patched(model):
        return model
    hooks = plugin_hooks(model)
    if hooks is not None:
        hooks.detach(model)
    with state_lock(model).exclusive():
        model.__class__ = next(c for c in type(model).__mro__[1:] if c is not CompressedViTMixin
                               and not issubclass(c, CompressedViTMixin))
    for name in ("_tocom", "_tocom_r", "last_state", "_tocom_lock", _HOOKS):
        model.__dict__.pop(name, None)
    return model

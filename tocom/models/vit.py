"""Family ``timm-vit``: timm ``VisionTransformer`` (DeiT distilled, registers, layer scale, q/k norm).

Patching swaps the model's class for a subclass whose ``forward_tokens`` and ``forward_head`` run
:func:`tocom.models.blocks.block_forward`; unpatching swaps it back. No weights are touched, so
unpatching restores bit-identical outputs. The reference family: every optional feature of the
adapter contract (:mod:`tocom.models.adapter`), dense mode included.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from tocom.compress import Schedule, ViTDims, initial_source
from tocom.models.adapter import Adapter, QVProjections, SizedPoolMixin, fused_qv
from tocom.models.blocks import CompressionConfig, QVDelta, TokenState, block_forward
from tocom.models.state import TokensMixin, require_sizes

SUPPORTED = "timm VisionTransformer models (ViT, DeiT, DeiT distilled, ViTs with registers) built from Block"


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer) or not hasattr(model, "blocks"):
        raise TypeError(f"tocom supports {SUPPORTED}; got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or not isinstance(blk.attn, Attention):
            raise TypeError(
                f"block {i} is {type(blk).__name__} with {type(blk.attn).__name__} attention; "
                f"tocom supports {SUPPORTED} (timm Block + Attention)"
            )


def timm_vit_dims(model: nn.Module) -> ViTDims:
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


class CompressedViTMixin(SizedPoolMixin, TokensMixin):
    """Methods shared by every patched timm ViT class."""

    def _forward_tokens(self, x: torch.Tensor, r: Schedule | None, qv_delta: QVDelta | None
                        ) -> tuple[torch.Tensor, TokenState]:
        config: CompressionConfig = self._tocom
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

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Tokens (B, N, C) -> logits (B, classes) or pooled features (B, C).

        ``size`` (B, N, 1) are the tokens' sizes from :meth:`forward_tokens`; average pooling of
        reduced tokens needs them.
        """
        if self.global_pool not in ("avg", "avgmax") or self.attn_pool is not None:
            return super().forward_head(x, pre_logits=pre_logits)
        require_sizes(x, size, self.patch_embed.num_patches + self.num_prefix_tokens)
        x = self.head_drop(self.fc_norm(self.pool(x, size=size)))
        return x if pre_logits else self.head(x)


class TimmViTAdapter(Adapter):
    family = "timm-vit"
    description = "timm VisionTransformer (ViT, DeiT + distilled, DeiT-3, CLIP, SigLIP, DINOv2, registers)"
    mixin = CompressedViTMixin
    features = frozenset({"per_call", "dense"})

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check(self, model: nn.Module) -> None:
        _check_supported(model)

    def dims(self, model: nn.Module) -> ViTDims:
        return timm_vit_dims(model)

    def qv_projections(self, model: nn.Module) -> list[QVProjections]:
        return [fused_qv(blk.attn, blk.attn.num_heads * blk.attn.head_dim) for blk in model.blocks]

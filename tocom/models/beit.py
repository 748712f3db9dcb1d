"""Adapter for timm ``Beit`` (BEiT, BEiT v2): relative position bias that follows merged tokens.

Each attention adds a bias ``b[h, i, j]`` for every pair of the original tokens (class token and
patches; per-block table plus the optional shared one). After a reduction a token stands for a set
of original tokens (the source map), and the rule is: **the bias between two reduced tokens is the
mean of the biases between their members** (``W b W^T`` with ``W`` the row-normalised source map).
For a kept token this gathers its own row and column exactly; a merged token gets the average over
its patches, matching the average its features are. EViT's fused token averages its members the
same way. Until the first reduction the model's own bias is used, so ``r = 0`` is bit-identical.

Adapter features (:mod:`tocom.models.adapter`): ``per_call`` (per-call degree, per-call q/v delta,
so compensator distillation works); not ``dense`` (dense mode is refused).
"""

from __future__ import annotations

import torch
from timm.models.beit import Beit, Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from tocom.compress import Schedule, ViTDims, initial_source
from tocom.models.adapter import (
    Adapter,
    QVProjections,
    add_qv,
    attend,
    fused_qv,
    need_for,
    reduce,
    weighted_mean,
)
from tocom.models.blocks import CompressionConfig, QVDelta, TokenState
from tocom.models.eva import timm_dims, timm_qkv
from tocom.models.state import TokensMixin, require_sizes


def follow_bias(bias: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Bias of the original tokens -> bias of reduced tokens by the member-mean rule.

    Args:
        bias: (1, H, N0, N0) over the original sequence.
        source: (B, N, N0) 0/1 membership of each reduced token.

    Returns:
        (B, H, N, N).
    """
    w = source.to(bias.dtype)
    w = (w / w.sum(-1, keepdim=True))[:, None]  # (B, 1, N, N0)
    return w @ bias @ w.transpose(-1, -2)


def block_bias(blk: nn.Module, shared: torch.Tensor | None) -> torch.Tensor | None:
    """(1, H, N0, N0) the bias one block adds over the original tokens, as timm sums it; or None."""
    attn = blk.attn
    bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    if shared is not None:
        bias = shared if bias is None else bias + shared
    return bias


def beit_block(blk: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, r: int,
               size: torch.Tensor | None, source: torch.Tensor | None, num_prefix: int,
               config: CompressionConfig, layer: int = 0, qv_delta: QVDelta | None = None):
    """One BEiT ``Block`` removing ``r`` tokens; ``bias`` already follows the current tokens.

    ``qv_delta(layer, normalised tokens)`` adds per-call (dq, dv) to q and v (a live compensator).

    Returns ``(x, size, source)`` with N - r tokens.
    """
    attn = blk.attn
    h = blk.norm1(x)
    q, k, v = timm_qkv(attn, h)
    q, v = add_qv(q, v, None if qv_delta is None else qv_delta(layer, h))
    out, metric = attend(q, k, v, size if config.prop_attn else None, need_for(config, r), bias,
                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(*h.shape[:2], -1)))
    x = x + blk.drop_path1(out if blk.gamma_1 is None else blk.gamma_1 * out)
    x, size, source, _ = reduce(x, metric, r, size, source, num_prefix, config,
                                getattr(blk, "merge_modulator", None), layer=layer)
    out = blk.mlp(blk.norm2(x))
    return x + blk.drop_path2(out if blk.gamma_2 is None else blk.gamma_2 * out), size, source


class CompressedBeitMixin(TokensMixin):
    """Forward methods of a patched ``Beit``."""

    def _forward_tokens(self, x: torch.Tensor, r: Schedule | None, qv_delta: QVDelta | None
                        ) -> tuple[torch.Tensor, TokenState]:
        config: CompressionConfig = self._tocom
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        batch, n, _ = x.shape
        npt = self.num_prefix_tokens
        schedule = self.effective_schedule(n, r)
        # The bias rule needs the membership map whether or not the caller asked to trace it.
        track = config.trace_source or any(schedule)
        source = initial_source(batch, n, x.device, x.dtype) if track else None
        state = TokenState(None, None, npt, schedule, qv_delta=qv_delta)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for layer, (blk, r_here) in enumerate(zip(self.blocks, schedule)):
            bias = block_bias(blk, shared)
            if bias is not None and state.size is not None:
                bias = follow_bias(bias, source)
            args = (blk, x, bias, r_here, state.size, source, npt, config, layer, qv_delta)
            x, state.size, source = (checkpoint(beit_block, *args, use_reentrant=False) if use_ckpt
                                     else beit_block(*args))
            state.tokens.append(x.shape[1])
        state.source = source if config.trace_source else None
        return self.norm(x), state

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Tokens (B, N, C) -> logits (B, classes); average pooling is size-weighted, so reduced tokens
        need their ``size`` (B, N, 1) from :meth:`forward_tokens`."""
        if self.global_pool == "avg":
            require_sizes(x, size, self._tocom_num_tokens())
            npt = self.num_prefix_tokens
            x = weighted_mean(x[:, npt:], None if size is None else size[:, npt:])
        elif self.global_pool:
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


class BeitAdapter(Adapter):
    family = "timm-beit"
    description = "timm Beit (BEiT, BEiT v2) with relative position bias"
    mixin = CompressedBeitMixin
    features = frozenset({"per_call"})

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, Beit)

    def check(self, model: nn.Module) -> None:
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block:
                raise TypeError(f"{type(model).__name__} block {i} is {type(blk).__name__}; "
                                "tocom supports timm.models.beit.Block")

    def dims(self, model: nn.Module) -> ViTDims:
        return timm_dims(model)

    def qv_projections(self, model: nn.Module) -> list[QVProjections]:
        return [fused_qv(blk.attn, blk.attn.proj.in_features) for blk in model.blocks]

"""Adapter for timm ``Eva``: EVA, EVA-02 and the RoPE ViTs (``vit_*_rope_*``).

Rotary embeddings rotate q and k by angles that are linear in a token's grid position, so a
merged token needs a position. The rule: **a merged token sits at the size-weighted mean
position of the patches it holds** (ToMe's weighting, the same average its features get).
Positions are tracked per token as grid coordinates, reduced with the features
(:func:`tocom.models.adapter.reduce`), and the rotary embedding of every block after the first
reduction is rebuilt from them with the model's own frequency bands. Until a reduction happens
the model's own embedding is used, so ``r = 0`` is bit-identical. Prefix tokens get no rotation,
as in timm. Supported rotary modules: none (EVA-01) and timm's ``RotaryEmbeddingCat`` (EVA-02,
the ``sbb`` and axial ``naver`` RoPE ViTs); other kinds (mixed, DINOv3, MRoPE) are refused.

ToMe's metric is the keys after any k-norm and *before* rotation: similarity of content, with
position handled by the rule above. SwiGLU / GLU MLPs, post-norm blocks, layer scale (gamma),
gated and q/k-normed attention run as in timm.

Adapter features (:mod:`tocom.models.adapter`): ``per_call`` (per-call degree, per-call q/v delta,
so compensator distillation works); not ``dense`` (dense mode is refused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, _build_grid, _rope_layout, apply_rot_embed_cat
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
from torch import nn
from torch.utils.checkpoint import checkpoint

from tocom.compress import Schedule, ViTDims, initial_source
from tocom.models.adapter import (
    Adapter,
    Projection,
    QVProjections,
    SizedPoolMixin,
    add_qv,
    attend,
    fused_qv,
    need_for,
    reduce,
)
from tocom.models.blocks import CompressionConfig, QVDelta, TokenState
from tocom.models.state import TokensMixin, require_sizes


def rope_coords(rope: RotaryEmbeddingCat, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H*W, 2) the coordinates timm's rotary module uses for a ``grid`` of patches."""
    shape = list(rope.feat_shape) if rope.feat_shape is not None else list(grid)
    coords = _build_grid(shape, grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape,
                         grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                         normalize_coords=rope.normalize_coords, device=device)
    return coords.flatten(0, -2)


def rope_embed(rope: RotaryEmbeddingCat, coords: torch.Tensor) -> torch.Tensor:
    """Rotary embedding at arbitrary positions: coords (B, N, 2) -> (B, 1, N, 2 * dim), sin then cos."""
    angles = (coords[..., None] * rope.bands.to(coords.device)).flatten(-2)
    angles = _rope_layout(angles, rope.rotate_half)
    return torch.cat([angles.sin(), angles.cos()], -1)[:, None]


def timm_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, head_dim) from a fused ``qkv`` Linear with EVA/BEiT's separate q and v biases."""
    batch, n, _ = x.shape
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        qkv = attn.qkv(x)
    else:
        bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
        if type(attn.qkv) is nn.Linear and not attn.qkv_bias_separate:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=bias)  # timm's exact arithmetic
        else:  # the Linear is wrapped (compensator, LoRA): call it so the wrapper acts
            qkv = attn.qkv(x) + bias
    return qkv.reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def eva_attention(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, size: torch.Tensor | None,
                  need: str | None, qv: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``EvaAttention`` / ``AttentionRope`` with proportional attention and a reduction metric.

    Args:
        x: (B, N, C) attention input; rope: (N_patches, 2 * dim) or (B, 1, N_patches, 2 * dim).
        qv: per-call (dq, dv), each (B, N, attn_dim), added to q and v before the q/k norms.

    Returns:
        output (B, N, C) and the metric of :func:`tocom.models.adapter.attend`.
    """
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        q, k, v = timm_qkv(attn, x)
    else:
        q, k, v = (proj(x).reshape(batch, n, attn.num_heads, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, v = add_qv(q, v, qv)
    q, k = attn.q_norm(q), attn.k_norm(k)
    metric = k.mean(1) if need == "keys" else None
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2).type_as(v)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out, cls_metric = attend(q, k, v, size, "cls_attn" if need == "cls_attn" else None, dropout_p=dropout)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), (metric if need == "keys" else cls_metric)


def eva_block(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, r: int,
              size: torch.Tensor | None, source: torch.Tensor | None, coords: torch.Tensor | None,
              num_prefix: int, config: CompressionConfig, layer: int = 0, qv_delta: QVDelta | None = None):
    """One ``EvaBlock`` / ``EvaBlockPostNorm`` removing ``r`` tokens between attention and MLP.

    Returns ``(x, size, source, coords)`` with N - r tokens; coords: (B, N, 2) or None.
    """
    post = isinstance(blk, EvaBlockPostNorm)
    attn_size = size if config.prop_attn else None
    h = x if post else blk.norm1(x)
    qv = None if qv_delta is None else qv_delta(layer, h)
    out, metric = eva_attention(blk.attn, h, rope, attn_size, need_for(config, r), qv)
    if post:
        out = blk.norm1(out)
    elif blk.gamma_1 is not None:
        out = blk.gamma_1 * out
    x = x + blk.drop_path1(out)
    x, size, source, coords = reduce(x, metric, r, size, source, num_prefix, config,
                                     getattr(blk, "merge_modulator", None), coords, layer=layer)
    if post:
        return x + blk.drop_path2(blk.norm2(blk.mlp(x))), size, source, coords
    out = blk.mlp(blk.norm2(x))
    if blk.gamma_2 is not None:
        out = blk.gamma_2 * out
    return x + blk.drop_path2(out), size, source, coords


class CompressedEvaMixin(SizedPoolMixin, TokensMixin):
    """Forward methods of a patched ``Eva``."""

    def _forward_tokens(self, x: torch.Tensor, r: Schedule | None, qv_delta: QVDelta | None
                        ) -> tuple[torch.Tensor, TokenState]:
        config: CompressionConfig = self._tocom
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(self.patch_embed.grid_size)
        x, rope = self._pos_embed(x)
        x = self.norm_pre(x)
        batch, n, _ = x.shape
        npt = self.num_prefix_tokens
        schedule = self.effective_schedule(n, r)
        coords = None
        if self.rope is not None and any(schedule):
            patch_coords = rope_coords(self.rope, grid, x.device).expand(batch, -1, -1)
            coords = torch.cat([patch_coords.new_zeros(batch, npt, 2), patch_coords], 1)
        source = initial_source(batch, n, x.device, x.dtype) if config.trace_source else None
        state = TokenState(None, source, npt, schedule, qv_delta=qv_delta)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for layer, (blk, r_here) in enumerate(zip(self.blocks, schedule)):
            if state.size is not None and coords is not None:  # reduced: rotate by the tracked positions
                rope = rope_embed(self.rope, coords[:, npt:])
            args = (blk, x, rope, r_here, state.size, state.source, coords, npt, config, layer, qv_delta)
            x, state.size, state.source, coords = (checkpoint(eva_block, *args, use_reentrant=False)
                                                   if use_ckpt else eva_block(*args))
            state.tokens.append(x.shape[1])
        return self.norm(x), state

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Tokens (B, N, C) -> logits (B, classes) or pooled features (B, C); ``size`` (B, N, 1) from
        :meth:`forward_tokens` (average pooling of reduced tokens needs it)."""
        if self.global_pool in ("avg", "avgmax") and self.attn_pool is None:
            require_sizes(x, size, self._tocom_num_tokens())
        x = self.head_drop(self.fc_norm(self.pool(x, size=size)))
        return x if pre_logits else self.head(x)


class EvaAdapter(Adapter):
    family = "timm-eva"
    description = "timm Eva (EVA, EVA-02, RoPE ViTs vit_*_rope_* with axial 'cat' rotary embeddings)"
    mixin = CompressedEvaMixin
    features = frozenset({"per_call"})

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def check(self, model: nn.Module) -> None:
        name = type(model).__name__
        if model.rope is not None and not isinstance(model.rope, RotaryEmbeddingCat):
            raise TypeError(f"{name} uses {type(model.rope).__name__} rotary embeddings; tocom supports "
                            "RotaryEmbeddingCat (rope_type='cat') and no RoPE, where merged tokens take "
                            "the size-weighted mean position")
        if model.patch_drop is not None:
            raise TypeError(f"{name} has patch dropout; create it with patch_drop_rate=0 to compress tokens")
        for i, blk in enumerate(model.blocks):
            if type(blk) not in (EvaBlock, EvaBlockPostNorm):
                raise TypeError(f"{name} block {i} is {type(blk).__name__}; "
                                "tocom supports EvaBlock and EvaBlockPostNorm")
            if getattr(blk.attn, "num_kv_groups", 1) != 1:
                raise TypeError(f"{name} block {i} uses grouped-query attention; tocom does not support it")

    def dims(self, model: nn.Module) -> ViTDims:
        return timm_dims(model)

    def qv_projections(self, model: nn.Module) -> list[QVProjections]:
        out = []
        for blk in model.blocks:
            attn = blk.attn
            if attn.qkv is not None:
                out.append(fused_qv(attn, attn.proj.in_features))
            else:
                out.append(QVProjections(Projection(attn, "q_proj", slice(None)),
                                         Projection(attn, "v_proj", slice(None))))
        return out


def timm_dims(model: nn.Module) -> ViTDims:
    """Shape facts of a timm Eva / Beit model; gated MLPs count their three matrices."""
    mlp = model.blocks[0].mlp
    hidden = mlp.fc2.in_features
    if hasattr(mlp, "fc1_g") or type(mlp).__name__ == "GluMlp":
        hidden = hidden * 3 // 2  # x W_g, x W_x, h W_2: 3 d h MACs = 2 d (1.5 h)
    patch = model.patch_embed.patch_size
    return ViTDims(
        depth=len(model.blocks), embed_dim=model.embed_dim, mlp_hidden=hidden,
        num_patches=model.patch_embed.num_patches, num_prefix=model.num_prefix_tokens,
        patch_size=patch[0] if isinstance(patch, tuple) else patch,
        in_chans=model.patch_embed.proj.in_channels, num_classes=getattr(model, "num_classes", 0),
        attn_dim=model.blocks[0].attn.proj.in_features,
    )

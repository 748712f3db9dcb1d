"""The plugin in training: a fused masked low-rank product added to q and v on the fly."""

from __future__ import annotations

import torch
from torch import nn

from tocom.compensator.plugin import Compensator


class LiveQKV(nn.Module):
    """Wraps a block's fused qkv projection; adds the plugin's q and v deltas for the current pair."""

    def __init__(self, base: nn.Module, plugin: Compensator, layer: int):
        super().__init__()
        self.base = base
        self.layer = layer
        # Not a submodule: the plugin is trained and saved on its own, not as part of the model.
        object.__setattr__(self, "plugin", plugin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in) -> (B, N, 3 * attn_dim)."""
        out = self.base(x)
        coeff = self.plugin.live_coeff
        if coeff is None:
            return out
        delta = self.plugin.low_rank(self.layer, coeff, x)  # (B, N, 2, attn_dim)
        d = delta.shape[-1]
        return torch.cat([out[..., :d] + delta[..., 0, :], out[..., d : 2 * d],
                          out[..., 2 * d :] + delta[..., 1, :]], dim=-1)


def install_live(model: nn.Module, plugin: Compensator) -> nn.Module:
    """Wrap every block's qkv so the plugin's delta for ``plugin.live_coeff`` is applied in forward."""
    plugin.live_coeff = None
    for i, blk in enumerate(model.blocks):
        if isinstance(blk.attn.qkv, LiveQKV):
            raise ValueError("the plugin is already live in this model")
        blk.attn.qkv = LiveQKV(blk.attn.qkv, plugin, i)
    return model


def remove_live(model: nn.Module) -> nn.Module:
    """Undo :func:`install_live`."""
    for blk in model.blocks:
        if isinstance(blk.attn.qkv, LiveQKV):
            blk.attn.qkv = blk.attn.qkv.base
    return model


def set_pair(plugin: Compensator, source: int, target: int, scale: float | None = None) -> None:
    """Make live wrappers apply delta(source -> target); ``source == target`` applies nothing."""
    plugin.live_coeff = None if source == target else plugin.coefficients(source, target, scale).float()

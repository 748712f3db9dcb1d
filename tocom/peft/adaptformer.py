"""AdaptFormer: a bottleneck adapter in parallel to a ViT block's MLP.

The paper's block is ``X' = X + MLP(LN(X)) + s * ReLU(X W_down) W_up`` -- note the adapter
reads X *before* norm2. timm's block computes ``x + drop_path2(ls2(mlp(norm2(x))))`` and the
token-merging forward calls the same modules, so the adapter is put inside those slots instead
of patching any forward: ``norm2`` becomes ``nn.Identity()`` and ``mlp`` becomes
:class:`ParallelAdapterMLP`, which applies the original norm itself. With layer scale the block
then computes ``x + ls2(MLP(LN(x)) + s * adapter(x))``, i.e. the adapter output is scaled by
``ls2`` too (and passes through drop_path2); without layer scale ``ls2`` is the identity.

The adapter is nonlinear (ReLU), so unlike LoRA it cannot be folded into plain weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    """``ReLU(x W_down + b_down) W_up + b_up``: ``(..., D)`` -> ``(..., D)``.

    ``down`` uses the usual Linear (kaiming-uniform) init; ``up`` is zero-initialised so that a
    freshly added adapter contributes exactly 0 and the pre-trained model is unchanged.
    """

    def __init__(self, dim: int, bottleneck: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """down: kaiming-uniform(a=sqrt(5)) weight and zero bias; up: all zeros."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class ParallelAdapterMLP(nn.Module):
    """Stands in ``blk.mlp`` (with ``blk.norm2 = nn.Identity()``): ``mlp(norm(x)) + s * adapter(x)``.

    Args:
        norm: the block's original ``norm2`` module (kept, so it can be restored as-is).
        mlp: the block's original ``mlp`` module.
        adapter: maps ``(..., D)`` -> ``(..., D)``; reads the *un-normalised* block input.
        scale: fixed multiplier s (a plain float, not trained; the paper uses 0.1).
    Shapes: ``x`` is ``(B, N, D)`` (any leading dims work); the output has the same shape.
    """

    def __init__(self, norm: nn.Module, mlp: nn.Module, adapter: nn.Module, scale: float = 0.1) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = mlp
        self.adapter = adapter
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.scale * self.adapter(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


def wrap_block(block: nn.Module, dim: int, bottleneck: int, scale: float) -> ParallelAdapterMLP:
    """Install an adapter into ``block`` (module replacement only) and return the new ``mlp``.

    The adapter is created on the device/dtype of the block's existing MLP parameters.
    """
    ref = next(block.mlp.parameters(), None)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    wrapper = ParallelAdapterMLP(block.norm2, block.mlp, BottleneckAdapter(dim, bottleneck, **factory), scale)
    block.norm2 = nn.Identity()
    block.mlp = wrapper
    return wrapper


def unwrap_block(block: nn.Module) -> None:
    """Undo :func:`wrap_block`: put the original ``norm2`` and ``mlp`` objects back."""
    wrapper = block.mlp
    if not isinstance(wrapper, ParallelAdapterMLP):
        raise ValueError("block has no AdaptFormer adapter to remove")
    block.norm2 = wrapper.norm
    block.mlp = wrapper.mlp

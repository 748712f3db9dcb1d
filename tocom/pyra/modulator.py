"""PYRA token modulation (Xiong et al., ECCV 2024) as a hook into ToMe's merge step.

Before block l merges its r source tokens ``M_s`` (set A) into their destinations ``M_t`` (set B)::

    M   = LayerNorm(M_s + M_t)                       (B, r, D)
    d_D = M W_r        channel weights, W_r: (r,)    (B, D)    -- one weight per channel
    d_r = W_D M        pair weights,    W_D: (D,)    (B, r)    -- one weight per merged pair
    M_s <- M_s + (2 sigmoid(d_r) - 1) * 2 sigmoid(d_D) * M_s

As in the paper, W_r starts Gaussian (``init="gaussian"``, std :data:`GAUSSIAN_STD`; the paper does
not publish the std) and W_D starts at zero, so ``2 sigmoid(0) - 1 = 0`` and the model is unchanged
at initialisation. ``init="uniform"`` keeps the earlier U(-1, 1) (kaiming-uniform of an (r, 1)
matrix, as in the official code). The LayerNorm has no learned affine: its weight and bias stay at
(1, 0) and are frozen (they are kept as parameters so checkpoints written when they trained still
load). Only W_r and W_D train (:data:`PARAM_PATTERN`, :func:`pyra_parameters`). Because W_r has one
entry per pair, each block's r is fixed once PYRA is added.
"""

from __future__ import annotations

import torch
from torch import nn

from tocom.compress import ViTDims, check_unclamped, clamp_schedule, resolve_schedule
from tocom.models import dims_of, family_of, is_patched

# W_r and W_D only: the LayerNorm's affine stays at (1, 0), so mark_trainable must not pick it up.
PARAM_PATTERN = "blocks.*.merge_modulator.w_*"  # for tocom.peft.mark_trainable(extra=...)
ATTR = "merge_modulator"  # the block attribute tocom.models.blocks calls before merging
INITS = ("gaussian", "uniform")
GAUSSIAN_STD = 0.02  # timm's ViT init; the paper says "Gaussian" without a std


class PyraModulator(nn.Module):
    """Modulates the ``r`` source tokens of one block's merge; a :data:`tocom.compress.Modulator`.

    Args:
        dim: token width D.
        r: pairs merged in this block (fixed: W_r has one weight per pair).
        layer: block index, for error messages.
        init: how W_r starts. ``"gaussian"`` (default): N(0, 0.02^2). The paper initialises W_r
            from a Gaussian but does not publish its std; 0.02 (timm's ViT init) is our choice.
            ``"uniform"``: U(-1, 1), what the official code's kaiming-uniform gives. Either way
            W_D starts at zero, so the modulator is the identity until it trains.

    The LayerNorm's weight and bias are created frozen (``requires_grad=False``) at (1, 0).
    """

    def __init__(self, dim: int, r: int, layer: int = -1, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, init: str = "gaussian") -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"PYRA needs r > 0 pairs, got r={r}")
        if init not in INITS:
            raise ValueError(f"unknown PYRA init {init!r}; choose one of {INITS}")
        factory = {"device": device, "dtype": dtype}
        self.r, self.layer, self.init = r, layer, init
        # Kept as parameters (not elementwise_affine=False) so older checkpoints, which trained
        # them, still load strictly and run as they were trained.
        self.norm = nn.LayerNorm(dim, **factory).requires_grad_(False)
        self.w_r = nn.Parameter(torch.empty(r, **factory))
        self.w_d = nn.Parameter(torch.empty(dim, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_r from ``self.init``, W_D = 0 (identity), LayerNorm at (1, 0)."""
        if self.init == "gaussian":
            nn.init.normal_(self.w_r, 0.0, GAUSSIAN_STD)
        else:
            nn.init.uniform_(self.w_r, -1.0, 1.0)
        nn.init.zeros_(self.w_d)
        self.norm.reset_parameters()

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """``src``, ``dst``: (B, r, D) sources and their destinations -> modulated sources (B, r, D)."""
        if src.shape[-2] != self.r:
            raise ValueError(
                f"PYRA in block {self.layer} was built for r={self.r} pairs but this merge has "
                f"{src.shape[-2]}: the schedule or the input size changed after add_pyra; restore it, "
                "or call remove_pyra(model) and add_pyra(model) (which retrains from scratch)"
            )
        m = self.norm(src + dst)  # (B, r, D)
        w_r, w_d = self.w_r.to(m.dtype), self.w_d.to(m.dtype)
        # Batched products that read m in place (einsum, or m^T @ w_r, would first copy m).
        channel = torch.bmm(w_r.view(1, 1, -1).expand(m.shape[0], 1, -1), m)  # d_D: (B, 1, D)
        pair = m @ w_d.unsqueeze(-1)  # d_r: (B, r, 1)
        # 2 sigmoid(d_r) - 1 == tanh(d_r / 2); times 2 sigmoid(d_D) it broadcasts to (B, r, D).
        gate = (pair * 0.5).tanh() * (2 * channel.sigmoid())
        return torch.addcmul(src, gate.to(src.dtype), src)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, r={self.r}, dim={self.w_d.shape[0]}, init={self.init}"


def add_pyra(model: nn.Module, init: str = "gaussian") -> nn.Module:
    """Add a :class:`PyraModulator` to every block with r > 0 in ``model``'s current schedule.

    The model must be patched with ``tocom.patch(model, "tome")`` and its schedule set
    (``model.r = ...``). The model's outputs are unchanged right after this call. ``init`` is how
    W_r starts (:class:`PyraModulator`: ``"gaussian"``, the paper's, or ``"uniform"``).

    Raises:
        ValueError: not a ToMe-patched model, a schedule that would be clamped (the message
            names the block), r = 0 everywhere, PYRA already present, or an unknown ``init``.
    """
    if init not in INITS:
        raise ValueError(f"unknown PYRA init {init!r}; choose one of {INITS}")
    if not is_patched(model) or model._tocom.method != "tome":
        raise ValueError("PYRA modulates ToMe merges: call tocom.patch(model, 'tome') and set model.r first")
    if family_of(model) != "timm-vit":  # untested elsewhere, and its LoRA (tocom.peft) is timm-vit only
        raise ValueError(f"PYRA supports timm VisionTransformer models (timm-vit) for now; this "
                         f"{type(model).__name__} is a {family_of(model)} model")
    dims = dims_of(model)
    schedule = check_unclamped(resolve_schedule(model.r, dims.depth), dims.num_tokens, dims.num_prefix)
    if not any(schedule):
        raise ValueError("the model's schedule is r=0 in every block, so nothing merges for PYRA to "
                         "modulate; set model.r (e.g. parse_schedule('high', dims_of(model))) first")
    if any(hasattr(blk, ATTR) for blk in model.blocks):
        raise ValueError("model already has PYRA modulators; call remove_pyra(model) first")
    for i, (blk, r) in enumerate(zip(model.blocks, schedule)):
        if r > 0:
            ref = blk.norm1.weight
            setattr(blk, ATTR, PyraModulator(dims.embed_dim, r, i, device=ref.device, dtype=ref.dtype,
                                             init=init))
    return model


def remove_pyra(model: nn.Module) -> nn.Module:
    """Drop every PYRA modulator (plain ToMe merges again); returns ``model``."""
    for blk in model.blocks:
        if hasattr(blk, ATTR):
            delattr(blk, ATTR)
    return model


def pyra_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of :func:`add_pyra`'s modulators that train: W_r and W_D of each, in block order.

    The LayerNorm's frozen (1, 0) affine is not among them (it stays in the state dict).
    """
    mods = [getattr(blk, ATTR) for blk in model.blocks if hasattr(blk, ATTR)]
    return [p for mod in mods for p in (mod.w_r, mod.w_d)]


def pyra_schedule(model: nn.Module) -> list[int]:
    """Per-block r the model's modulators were built for (0 where a block has none)."""
    return [getattr(blk, ATTR).r if hasattr(blk, ATTR) else 0 for blk in model.blocks]


def pyra_flops(dims: ViTDims, schedule: list[int]) -> int:
    """Extra multiply-accumulates of PYRA per image (fvcore-style counting), for a per-block schedule.

    Per merged pair and channel: the sum M_s + M_t (1), LayerNorm with affine (5, fvcore's count),
    the two projections d_D and d_r (1 each) and the gated update ``src + gate * src`` with its
    gate product (2); plus 2 sigmoids per channel and per pair (counted as 1 each).
    """
    total = 0
    for r in clamp_schedule(schedule, dims.num_tokens, dims.num_prefix):
        if r:
            total += 10 * r * dims.embed_dim + dims.embed_dim + r
    return total

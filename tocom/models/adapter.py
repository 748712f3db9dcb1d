"""The adapter interface: what a backbone family provides so that tocom can compress it.

A family (timm ``VisionTransformer``, timm ``Eva``, timm ``Beit``, Hugging Face ViTs, ...) is one
file in ``tocom/models/`` holding one :class:`Adapter` subclass, listed in
:mod:`tocom.models.registry`, which dispatches ``patch``, ``unpatch``, ``dims_of`` and
``schedule_report`` and makes the checks every family shares (method, mode, plugin hooks, PYRA).

The contract, the hooks a family must provide:

``family``, ``description``
    a short stable name (``"timm-vit"``, ``"timm-eva"``, ...) and one line for error messages.
    Compensator plugins record the family, so a plugin trained on one family is refused by another.
``features``
    which optional parts of the API the family implements (:data:`FEATURES`); the registry and
    the compensator refuse the others with an error naming the family:

    - ``"per_call"``: timm's call API with a per-call degree, ``model(x, r=t)``,
      ``model.forward_tokens(x, r=t, qv_delta=d)`` and ``model.forward_head(x, size=s)`` (the
      patched class inherits :class:`tocom.models.state.TokensMixin`). Its attention adds the
      per-call q/v delta ``qv_delta(layer, attention input) -> (dq, dv)`` to q and v before any
      q/k norm, exactly where a folded delta acts. Per-call degrees on a plugin-carrying model
      and compensator distillation need it.
    - ``"dense"``: ``patch(model, mode="dense")`` (merge before each MLP, unmerge after).

    Today: ``timm-vit`` has both; ``timm-eva``, ``timm-beit`` and ``hf-vit`` have ``per_call``
    (``hf-vit`` in Hugging Face's calling convention: ``model(pixel_values, r=t)`` returns HF's output).
``claims(model) -> bool``
    cheap recognition (class, or for optional libraries the class's module name, so that the
    core never imports them); the first adapter that claims a model serves it.
``check(model)``
    raise ``TypeError`` naming the part of a claimed model that the adapter cannot handle.
``patch(model, config)`` / ``unpatch(model)``
    swap classes (never weights) so that forwards reduce tokens, and undo it exactly. ``patch``
    gives the model its state with :func:`tocom.models.state.init_state` (config, degree 0, the
    state lock). A family whose forwards live in the model's own class only sets ``mixin`` (the
    defaults mix it into the class and take it out again); one whose layer loop lives in a
    submodule (Hugging Face) overrides both and shares the model's lock with that submodule.
    ``model.r`` (from :class:`tocom.models.state.CompressedMixin`) switches the degree under the
    lock, and every forward holds the lock's shared side while it reads degree and weights.
    Per-forward state (sizes, source, schedule) is created inside the forward and passed along
    explicitly. ``unpatch`` is only called after the plugin hooks detached a plugin.
``reconfigure(model, config)``
    a patched model takes new options (called under the exclusive lock).
``dims(model) -> ViTDims``
    shape facts for schedules and FLOPs (``num_prefix`` = protected leading tokens).
``blocks(model)``, ``num_heads(model)``, ``has_class_token(model)``
    the transformer blocks in order (PYRA modulators hang on them), heads per block, and whether
    token 0 is a class token (EViT ranks by its attention).
``qv_projections(model) -> list[QVProjections]``
    per block, where W_q and W_v live: a :class:`Projection` names the module holding the
    ``nn.Linear`` and the rows of its weight that are the projection (fused ``qkv`` rows or a
    whole separate ``Linear``). Compensators fold their deltas there without knowing the family.

Inside a block forward a family computes its own q, k, v and calls the shared pieces here:
:func:`attend` (SDPA with proportional attention and the reduction metric), :func:`add_qv` (the
per-call delta) and :func:`reduce` (ToMe, PiToMe or ToFu merge, or EViT prune, through
:mod:`tocom.compress`, carrying any extra per-token tensor such as positions as a size-weighted
mean); PiToMe and ToFu follow the block's depth, so a family passes ``layer=`` to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tocom.compress import ViTDims
from tocom.models.blocks import CompressionConfig, metric_for, reduce_tokens
from tocom.models.sdpa import proportional_sdpa, size_bias
from tocom.models.state import init_state

FEATURES = ("per_call", "dense")
_PATCHED: dict[tuple[type, type], type] = {}  # (mixin, class) -> patched class


@dataclass(frozen=True)
class Projection:
    """Rows ``rows`` of the weight of the ``nn.Linear`` at ``getattr(owner, name)``."""

    owner: nn.Module
    name: str
    rows: slice

    @property
    def linear(self) -> nn.Module:
        return getattr(self.owner, self.name)


@dataclass(frozen=True)
class QVProjections:
    """Where one block's W_q and W_v live (the same Linear for a fused qkv)."""

    q: Projection
    v: Projection


class Adapter:
    """Base class of a backbone family; see the module docstring for the contract."""

    family: str = ""
    description: str = ""
    features: frozenset[str] = frozenset()
    mixin: type | None = None  # what the default patch mixes into the model's class


    def claims(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise TypeError for a claimed model this adapter cannot handle (default: none)."""

    def patch(self, model: nn.Module, config: CompressionConfig) -> None:
        """Default: mix :attr:`mixin` into the model's class and give the model its state."""
        swap_class(model, self.mixin)
        init_state(model, config)

    def unpatch(self, model: nn.Module) -> None:
        """Default: undo the class swap (the registry drops the state)."""
        restore_class(model)

    def reconfigure(self, model: nn.Module, config: CompressionConfig) -> None:
        model._tocom = config

    def dims(self, model: nn.Module) -> ViTDims:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def num_heads(self, model: nn.Module) -> int:
        """Attention heads per block (default: timm's ``blocks[0].attn.num_heads``)."""
        return self.blocks(model)[0].attn.num_heads

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(model, "cls_token", None) is not None

    def qv_projections(self, model: nn.Module) -> list[QVProjections]:
        raise NotImplementedError


def fused_qv(owner: nn.Module, attn_dim: int, name: str = "qkv") -> QVProjections:
    """W_q and W_v as the first and last thirds of a fused ``qkv`` Linear."""
    return QVProjections(Projection(owner, name, slice(0, attn_dim)),
                         Projection(owner, name, slice(2 * attn_dim, 3 * attn_dim)))


def swap_class(model: nn.Module, mixin: type) -> None:
    """Make ``model`` an instance of ``(mixin, its class)``; reversible by :func:`restore_class`."""
    cls = type(model)
    if (mixin, cls) not in _PATCHED:
        _PATCHED[mixin, cls] = type(f"Compressed{cls.__name__}", (mixin, cls), {"_tocom_base": cls})
    model.__class__ = _PATCHED[mixin, cls]


def restore_class(model: nn.Module) -> None:
    """Undo :func:`swap_class`."""
    base = type(model).__dict__.get("_tocom_base")
    if base is not None:
        model.__class__ = base


def add_qv(q: torch.Tensor, v: torch.Tensor, qv: tuple[torch.Tensor, torch.Tensor] | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, v (B, H, N, head_dim) plus a per-call delta (dq, dv), each (B, N, H * head_dim), or as they are."""
    if qv is None:
        return q, v
    batch, heads, n, dim = q.shape
    dq, dv = (d.reshape(batch, n, heads, dim).transpose(1, 2) for d in qv)
    return q + dq.to(q.dtype), v + dv.to(v.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None,
           need: str | None, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
           scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with proportional attention and a reduction metric.

    Args:
        q, k, v: (B, H, N, head_dim).
        size: (B, N, 1) token sizes; ``log(size)`` of each key is added to the logits when given
            (as a float mask or an extra q/k channel: :mod:`tocom.models.sdpa`).
        need: ``"keys"`` (ToMe: keys averaged over heads, (B, N, head_dim)), ``"cls_attn"``
            (EViT: first token's attention averaged over heads, (B, N)) or None.
        bias: additive logits broadcastable to (B, H, N, N) (e.g. relative position bias).
        scale: logit scale; None is ``head_dim ** -0.5``.

    Returns:
        attention output (B, H, N, head_dim) and the metric (or None).
    """
    out = proportional_sdpa(q, k, v, size, bias, dropout_p, scale)
    metric = None
    if need == "keys":
        metric = k.mean(1)
    elif need == "cls_attn":
        s = q.shape[-1] ** -0.5 if scale is None else scale
        logits = (q[:, :, :1] * s) @ k.transpose(-2, -1)  # (B, H, 1, N): only the class token's row
        if size is not None:
            bias = size_bias(size, bias, q.dtype)
        if bias is not None:
            logits = logits + bias[..., :1, :]
        metric = logits.softmax(dim=-1).mean(1)[:, 0]
    return out, metric


def need_for(config: CompressionConfig, r: int) -> str | None:
    """Which metric :func:`attend` must return for a block removing ``r`` tokens."""
    return metric_for(config, r)


def reduce(x: torch.Tensor, metric: torch.Tensor | None, r: int, size: torch.Tensor | None,
           source: torch.Tensor | None, num_prefix: int, config: CompressionConfig,
           modulator=None, extra: torch.Tensor | None = None, layer: int | None = None):
    """Remove ``r`` tokens by the configured method (standard mode).

    Args:
        x: (B, N, C) tokens; size (B, N, 1) or None; source (B, N, N0) or None.
        metric: from :func:`attend`.
        modulator: a PYRA merge modulator (ToMe only) or None.
        extra: (B, N, E) per-token values (e.g. positions) that are reduced exactly like the
            features: a size-weighted mean over a merge (EViT's fused token: weighted like its
            features), or None.
        layer: the block's index (0-based); PiToMe and ToFu need it.

    Returns:
        ``(x, size, source, extra)`` each with N - r tokens (None stays None).
    """
    return reduce_tokens(x, metric, r, size, source, num_prefix, config, layer, modulator, extra)


class SizedPoolMixin:
    """``pool`` of a timm model (``VisionTransformer``, ``Eva``) with average pooling weighted by size."""

    def pool(self, x: torch.Tensor, pool_type: str | None = None, size: torch.Tensor | None = None
             ) -> torch.Tensor:
        """x (B, N, C), size (B, N, 1) or None -> (B, C); without sizes, timm's own pooling."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if size is None or self.attn_pool is not None or pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        if not getattr(self, "pool_include_prefix", False):  # Eva never pools its prefix tokens
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        mean = weighted_mean(x, size)
        return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)


def weighted_mean(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Size-weighted mean over tokens: x (B, N, C), size (B, N, 1) or None -> (B, C)."""
    if size is None:
        return x.mean(dim=1)
    return (x * size).sum(1) / size.sum(1)

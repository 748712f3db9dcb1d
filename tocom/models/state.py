"""What every patched model carries, whatever its family: config, degree, state lock, plugin hooks.

A patched model holds ``_tocom`` (its :class:`CompressionConfig`), ``_tocom_r`` (the schedule) and
``_tocom_lock`` (a :class:`StateLock`) in its ``__dict__``, outside the module tree and state dict.
:class:`CompressedMixin` gives it ``model.r`` (switching under the lock) and the effective schedule;
:class:`TokensMixin` adds timm's call API with a per-call degree: ``forward_tokens(x, r=, qv_delta=)``
under the shared side of the lock, with an attached plugin's live delta for that degree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tocom.compress import Schedule, clamp_schedule, dense_clamp, resolve_schedule
from tocom.models.blocks import CompressionConfig, QVDelta, TokenState
from tocom.models.lock import StateLock

_HOOKS = "_tocom_plugin"
STATE = ("_tocom", "_tocom_r", "_tocom_lock", "last_state", _HOOKS)


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


def init_state(model: nn.Module, config: CompressionConfig, lock: StateLock | None = None) -> None:
    """Give a freshly class-swapped module its config, degree 0 and a lock (or share ``lock``)."""
    model._tocom_lock = StateLock() if lock is None else lock
    model._tocom = config
    model._tocom_r = 0


def drop_state(model: nn.Module, extra: tuple[str, ...] = ()) -> None:
    """Remove what :func:`init_state` (and forwards, and plugins) left on ``model``."""
    for name in STATE + extra:
        model.__dict__.pop(name, None)


def with_plugin(model: nn.Module, r: Schedule | None, qv_delta: QVDelta | None) -> QVDelta | None:
    """The q/v additions of one call at degree ``r``: an attached plugin's live delta for that degree,
    or the caller's ``qv_delta`` (a plugin in training); both at once are refused."""
    hooks = plugin_hooks(model)
    if r is None or hooks is None:
        return qv_delta
    extra = hooks.at_degree(model, r)
    if extra is not None and qv_delta is not None:
        raise ValueError("a per-call degree on a model with an attached plugin cannot take another "
                         "qv_delta; detach the plugin first")
    return extra if extra is not None else qv_delta


class CompressedMixin:
    """``model.r`` and the effective schedule of a patched model (any family).

    A family whose blocks are not ``self.blocks``, or whose token count is not timm's
    ``patch_embed.num_patches + num_prefix_tokens``, overrides the three ``_tocom_*`` methods.
    """

    @property
    def r(self) -> Schedule:
        """The reduction schedule: int, per-block list, or ``(r, inflection)``."""
        return self._tocom_r

    @r.setter
    def r(self, value: Schedule) -> None:
        resolve_schedule(value, self._tocom_depth())  # validate now, not at the next forward
        with state_lock(self).exclusive():  # never between two blocks of a running forward
            self._tocom_r = value

    def _tocom_depth(self) -> int:
        return len(self.blocks)

    def _tocom_num_prefix(self) -> int:
        return self.num_prefix_tokens

    def _tocom_num_tokens(self) -> int:
        return self.patch_embed.num_patches + self._tocom_num_prefix()

    def effective_schedule(self, num_tokens: int | None = None, r: Schedule | None = None) -> list[int]:
        """Per-block r actually applied for ``num_tokens`` (default: the model's) at ``r`` (default:
        ``self.r``)."""
        n = self._tocom_num_tokens() if num_tokens is None else num_tokens
        r = self.r if r is None else r
        clamp = dense_clamp if self._tocom.mode == "dense" else clamp_schedule
        return clamp(resolve_schedule(r, self._tocom_depth()), n, self._tocom_num_prefix())


class TokensMixin(CompressedMixin):
    """timm's call API with a per-call degree; the family implements ``_forward_tokens``."""

    def forward_tokens(self, x: torch.Tensor, r: Schedule | None = None, qv_delta: QVDelta | None = None
                       ) -> tuple[torch.Tensor, TokenState]:
        """Images (B, 3, H, W) -> final normalised tokens (B, N_L, C) and their :class:`TokenState`.

        Args:
            r: a degree for this call only (default: ``self.r``); no shared state changes. With a
                plugin attached the call also gets the plugin's delta for that degree, on the fly.
            qv_delta: live q/v additions for this call (a plugin in training).
        """
        if torch.compiler.is_compiling():  # a traced graph holds no lock; see docs/export.md
            return self._forward_tokens(x, r, with_plugin(self, r, qv_delta))
        with state_lock(self).shared():  # degree and weights stay put until this forward ends
            return self._forward_tokens(x, r, with_plugin(self, r, qv_delta))

    def _forward_tokens(self, x: torch.Tensor, r: Schedule | None, qv_delta: QVDelta | None
                        ) -> tuple[torch.Tensor, TokenState]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, attn_mask: object = None, is_causal: bool = False, *,
                         r: Schedule | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, N_L, C). For their sizes use :meth:`forward_tokens`;
        ``self.last_state`` records the latest forward (of any thread) for inspection only."""
        refuse_masks(attn_mask, is_causal)
        x, state = self.forward_tokens(x, r)
        self.last_state = state
        return x

    def forward(self, x: torch.Tensor, attn_mask: object = None, is_causal: bool = False, *,
                r: Schedule | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> logits (or pooled features); ``r`` runs this call alone at that degree."""
        refuse_masks(attn_mask, is_causal)
        x, state = self.forward_tokens(x, r)
        self.last_state = state
        return self.forward_head(x, size=state.size)


def refuse_masks(attn_mask: object, is_causal: bool = False) -> None:
    """Attention masks index the original sequence; after a reduction they would be wrong."""
    if attn_mask is not None or is_causal:
        raise ValueError("attention masks do not survive token reduction; unpatch the model to use them")


def require_sizes(x: torch.Tensor, size: torch.Tensor | None, full_length: int) -> None:
    """Average pooling of reduced tokens (B, N, C) needs their sizes: refuse to guess them."""
    if size is None and x.shape[1] < full_length:
        raise ValueError(
            f"average pooling of {x.shape[1]} reduced tokens needs their sizes: call "
            "x, state = model.forward_tokens(images) and model.forward_head(x, size=state.size)"
        )

"""Proportional attention on ``F.scaled_dot_product_attention``, in one of two exact forms.

Proportional attention adds ``log(size)`` of each key to every query's logits. That bias is the same
for every query, so it need not be a float ``attn_mask`` (which keeps SDPA off the flash and cuDNN
kernels on a GPU): with the scale ``s`` passed explicitly,

    q' = [q, 1, 0...],  k' = [k, log(size) / s, 0...],  v' = [v, 0, 0...]
    s * q'.k' = s * q.k + log(size)

so one extra channel carries it and the output is ``SDPA(q', k', v')[..., :head_dim]``. The head
dimension is padded to a multiple of 8 (what the fused kernels want). The scale goes into the key's
channel, not the query's (``q' = 1`` exactly), so a 16-bit channel is rounded once, as the mask is.

Forms (:func:`set_prop_form`, or :func:`prop_form` for a block of code):

- ``"mask"``: today's float mask; the only form that also takes another additive bias (BEiT's relative
  position bias), so a call with ``bias`` always uses it.
- ``"channel"``: the extra channel.
- ``"auto"`` (default): ``"channel"`` on CUDA, ``"mask"`` elsewhere. On the CPU the flash kernel takes
  a float mask at no extra cost (profiler: ``aten::_scaled_dot_product_flash_attention_for_cpu`` for
  both forms; ``aten::_scaled_dot_product_attention_math`` for both with dropout), so padding the head
  dimension there would only add work.

Without sizes (nothing reduced yet, r = 0) the call is exactly ``SDPA(q, k, v, attn_mask=bias, ...)``,
whatever the form, so r = 0 stays bit-identical to the unpatched model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

FORMS = ("auto", "channel", "mask")
_form = "auto"


def _check(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"unknown proportional-attention form {form!r}; use one of {', '.join(FORMS)}")
    return form


def set_prop_form(form: str) -> None:
    """Choose how proportional attention reaches SDPA, process-wide: ``"auto"``, ``"channel"``, ``"mask"``.

    A compiled graph keeps the form it was traced with until it recompiles (the form is guarded on).
    """
    global _form
    _form = _check(form)


def get_prop_form() -> str:
    """The form set by :func:`set_prop_form` (``"auto"`` unless changed)."""
    return _form


@contextmanager
def prop_form(form: str) -> Iterator[None]:
    """Use ``form`` inside the block (process-wide, not per thread: for tests and benchmarks)."""
    global _form
    before, _form = _form, _check(form)
    try:
        yield
    finally:
        _form = before


def uses_channel(device: torch.device) -> bool:
    """Whether a sized call without another bias takes the channel form on ``device``."""
    return _form == "channel" or (_form == "auto" and device.type == "cuda")


def size_bias(size: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The mask form's logits bias: ``bias + log(size)`` of each key, size (B, N, 1) -> (B, 1, 1, N)."""
    log_size = size.log()[:, None, None, :, 0].to(dtype)
    return log_size if bias is None else bias + log_size


def size_channel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, D) -> (B, H, N, D') with ``log(size) / scale`` in key channel D, D' = D + 1
    rounded up to a multiple of 8; SDPA with ``scale`` on them adds ``log(size)`` to the logits."""
    lead, dim = q.shape[:-1], q.shape[-1]
    pad = -(dim + 1) % 8
    zeros = q.new_zeros(()).expand(*lead, pad)
    ones = q.new_ones(()).expand(*lead, 1)
    channel = (size.log() / scale).to(k.dtype)[:, None].expand(*k.shape[:-1], 1)  # (B, H, N, 1)
    q = torch.cat([q, ones, zeros], dim=-1)
    k = torch.cat([k, channel, zeros], dim=-1)
    v = F.pad(v, (0, 1 + pad))
    return q, k, v


def proportional_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None,
                      bias: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None
                      ) -> torch.Tensor:
    """SDPA with ``log(size)`` of each key (and ``bias``) added to the logits.

    Args:
        q, k, v: (B, H, N, D).
        size: (B, N, 1) token sizes, or None (then exactly ``SDPA(q, k, v, attn_mask=bias)``).
        bias: additive logits broadcastable to (B, H, N, N), or None; given, the mask form is used.
        scale: logit scale; None is ``D ** -0.5``.

    Returns:
        (B, H, N, D).
    """
    if size is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    if bias is None and uses_channel(q.device):
        dim = q.shape[-1]
        scale = dim ** -0.5 if scale is None else scale
        out = F.scaled_dot_product_attention(*size_channel(q, k, v, size, scale), dropout_p=dropout_p,
                                             scale=scale)
        return out[..., :dim]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size, bias, q.dtype),
                                          dropout_p=dropout_p, scale=scale)

"""Attaching a plugin to a model and switching its degree by folding deltas into W_q and W_v."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tocom.compensator.fit import check_fits, check_mode
from tocom.compensator.plugin import Compensator
from tocom.models import is_patched, patch
from tocom.peft import base_linear

_KEY = "_tocom_compensator"


@dataclass
class Attachment:
    """What :func:`attach` keeps on the model (outside its module tree and state dict)."""

    plugin: Compensator
    source: int
    degree: int
    scale: float | None
    originals: torch.Tensor  # (L, 2, attn_dim, embed_dim): untouched W_q and W_v, for exact detach


def _qv_rows(model: nn.Module) -> list[tuple[torch.Tensor, slice, slice]]:
    out = []
    for blk in model.blocks:
        weight = base_linear(blk.attn.qkv).weight
        d = blk.attn.num_heads * blk.attn.head_dim
        out.append((weight, slice(0, d), slice(2 * d, 3 * d)))
    return out


def attachment(model: nn.Module) -> Attachment:
    """The plugin state of a model; ValueError when none is attached."""
    att = model.__dict__.get(_KEY)
    if att is None:
        raise ValueError("no compensator is attached to this model; "
                         "call tocom.attach(model, plugin, source=s)")
    return att


def attach(model: nn.Module, plugin: Compensator, source: int, scale: float | None = None) -> nn.Module:
    """Attach ``plugin`` to a model fine-tuned at degree ``source`` (patching it if needed).

    The model then runs at ``source`` with no delta; :func:`set_degree` moves it.
    """
    check_fits(plugin.spec, model)
    plugin.check_degree(source)
    if _KEY in model.__dict__:
        raise ValueError("a compensator is already attached; call tocom.detach(model) first")
    if not is_patched(model):
        patch(model, plugin.spec.method, mode=plugin.spec.mode)
    check_mode(plugin.spec, model)
    rows = _qv_rows(model)
    originals = torch.stack([torch.stack([w[q], w[v]]) for w, q, v in rows]).detach().clone()
    plugin = plugin.to(device=originals.device)
    model.__dict__[_KEY] = Attachment(plugin, source, source, scale, originals)
    model.r = source
    return model


@torch.no_grad()
def set_degree(model: nn.Module, target: int, scale: float | None = None) -> nn.Module:
    """Run the model at degree ``target``: sets ``model.r`` and folds delta(source -> target).

    Weights are rebuilt from the untouched originals, so switching many times never drifts.
    """
    att = attachment(model)
    att.plugin.check_degree(target)
    scale = att.scale if scale is None else scale
    deltas = att.plugin.deltas(att.source, target, scale, dtype=att.originals.dtype)
    for (weight, q, v), orig, delta in zip(_qv_rows(model), att.originals, deltas):
        weight[q] = (orig[0] + delta[0]).to(weight.dtype)
        weight[v] = (orig[1] + delta[1]).to(weight.dtype)
    att.degree, att.scale = target, scale
    model.r = target
    return model


@torch.no_grad()
def detach(model: nn.Module) -> nn.Module:
    """Remove the plugin: W_q and W_v get their original values back, bit for bit."""
    att = attachment(model)
    for (weight, q, v), orig in zip(_qv_rows(model), att.originals):
        weight[q] = orig[0]
        weight[v] = orig[1]
    del model.__dict__[_KEY]
    model.r = att.source
    return model

"""Attaching a plugin to a model and switching its degree by folding deltas into W_q and W_v.

The model's weights are the truth. The attachment remembers the delta it has folded in, so the
pre-plugin weights are always *current weights minus applied delta*: a ``load_state_dict``, a
LoRA fold or an optimizer step after :func:`attach` is kept across switches (loaded weights are read
as weights at the current degree). For exact, drift-free switching it also keeps the pre-plugin
W_q/W_v rows, but only trusts them while each weight tensor is the one it last wrote (same
storage, same version counter); any other change to a weight re-derives them.

W_q and W_v are found through the model's family adapter (:func:`tocom.models.adapter_for`): rows of
a fused ``qkv`` Linear or whole separate ``q_proj`` / ``v_proj`` Linears, whatever the family.

Every change runs under the model's state lock (:func:`tocom.models.state_lock`), so a forward
on another thread never sees a half-switched model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tocom.compensator.bank import CompensatorBank
from tocom.compensator.fit import check_fits, check_mode
from tocom.compress import Schedule
from tocom.models import (
    PluginHooks,
    QVDelta,
    adapter_for,
    is_patched,
    patch,
    plugin_hooks,
    set_plugin_hooks,
    state_lock,
    unpatch,
    weights_fingerprint,
)
from tocom.peft import base_linear

_KEY = "_tocom_compensator"


@dataclass
class Attachment:
    """What :func:`attach` keeps on the model (outside its module tree and state dict).

    Attributes:
        base: (L, 2, attn_dim, embed_dim) pre-plugin W_q and W_v rows in the weights' dtype.
        applied: (K,) coefficients of the delta folded in now, None when zero.
        stamps: per block, (storage pointer, version) of its W_q and W_v weights right after our last
            write.
    """

    plugin: CompensatorBank
    source: int
    degree: int
    scale: float | None
    base: torch.Tensor
    applied: torch.Tensor | None = None
    stamps: list[tuple[tuple[int, int], ...]] = field(default_factory=list)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of 16-bit weights and deltas are formed in float32 and rounded once."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Per block, where W_q and W_v live: ((weight, q rows), (weight, v rows)); one weight when fused.
Target = tuple[tuple[torch.Tensor, slice], tuple[torch.Tensor, slice]]


def _targets(model: nn.Module) -> list[Target]:
    return [((base_linear(qv.q.linear).weight, qv.q.rows), (base_linear(qv.v.linear).weight, qv.v.rows))
            for qv in adapter_for(model).qv_projections(model)]


def _rows(target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of W_q (attn_dim, embed_dim) and W_v (attn_dim, embed_dim) inside their weights."""
    (wq, q), (wv, v) = target
    return wq[q], wv[v]


def _stamp(target: Target) -> tuple[tuple[int, int], ...]:
    return tuple((w.data_ptr(), w._version) for w, _ in target)


def attachment(model: nn.Module) -> Attachment:
    """The plugin state of a model; ValueError when none is attached."""
    att = model.__dict__.get(_KEY)
    if att is None:
        raise ValueError("no compensator is attached to this model; "
                         "call tocom.attach(model, plugin, source=s)")
    return att


def _sync_base(att: Attachment, targets: list[Target]) -> None:
    """Re-derive the pre-plugin rows of every weight changed since our last write."""
    w0 = targets[0][0][0]
    if att.base.device != w0.device or att.base.dtype != w0.dtype:  # the model was moved or cast
        att.base = torch.empty_like(att.base, device=w0.device, dtype=w0.dtype)
        att.stamps = [()] * len(targets)
        att.plugin.to(w0.device)
    applied = None  # the dense delta, only if some weight changed behind our back
    for i, target in enumerate(targets):
        if att.stamps[i] == _stamp(target):
            continue
        current = torch.stack([rows.detach() for rows in _rows(target)])
        if att.applied is not None:
            acc = _accumulation_dtype(w0.dtype)
            applied = att.plugin.delta_of(att.applied, acc) if applied is None else applied
            current = (current.to(acc) - applied[i]).to(w0.dtype)
        att.base[i] = current
        att.stamps[i] = _stamp(target)


def _fold(att: Attachment, targets: list[Target], coeff: torch.Tensor | None) -> None:
    """Write pre-plugin rows + delta(coeff) into every W_q and W_v, one fused product per row block
    (``base + b @ a``, never a dense delta), rounded once to the weights' dtype."""
    factors = None
    if coeff is not None:
        factors = att.plugin.factors(coeff, _accumulation_dtype(targets[0][0][0].dtype))
    for i, target in enumerate(targets):
        for p, rows in enumerate(_rows(target)):
            if factors is None:
                rows.copy_(att.base[i, p])
            elif factors[0].dtype == rows.dtype:
                torch.addmm(att.base[i, p], factors[0][i, p], factors[1][i, p], out=rows)
            else:  # 16-bit weights: the sum in float32, rounded once
                b, a = factors[0][i, p], factors[1][i, p]
                rows.copy_(torch.addmm(att.base[i, p].to(b.dtype), b, a))
        att.stamps[i] = _stamp(target)
    att.applied = coeff


def _coefficients(att: Attachment, target: int, scale: float | None) -> torch.Tensor | None:
    coeff = att.plugin.coefficients(att.source, target, scale)
    return coeff if coeff.any() else None


def _at_degree(model: nn.Module, r: Schedule) -> QVDelta | None:
    """Live additions that make the weights as folded now behave as at degree ``r`` (one call)."""
    att = attachment(model)
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"a compensated model runs at an int degree, got {r!r}; "
                         "tocom.detach(model) to run other schedules")
    att.plugin.check_degree(r)
    if r == att.degree:
        return None
    coeff = att.plugin.coefficients(att.source, r, att.scale) - att.plugin.coefficients(
        att.source, att.degree, att.scale)
    return att.plugin.live(coeff) if coeff.any() else None


def attach(model: nn.Module, plugin: CompensatorBank, source: int, scale: float | None = None) -> nn.Module:
    """Attach ``plugin`` to a model fine-tuned at degree ``source`` (patching it if needed).

    The model then runs at ``source`` with no delta; :func:`set_degree` moves it, and
    ``model(x, r=t)`` runs one call at degree ``t`` without moving it.
    """
    check_fits(plugin.spec, model)
    plugin.check_degree(source)
    if _KEY in model.__dict__:
        raise ValueError("a compensator is already attached; call tocom.detach(model) first")
    _warn_if_adapted_elsewhere(plugin, model, source)
    if not is_patched(model):
        patch(model, plugin.spec.method, mode=plugin.spec.mode)
    elif model._tocom.method != plugin.spec.method:
        raise ValueError(f"the plugin was trained for {plugin.spec.method} but the model is patched for "
                         f"{model._tocom.method}; use a {model._tocom.method} plugin or "
                         f"tocom.patch(model, {plugin.spec.method!r}) first")
    check_mode(plugin.spec, model)
    with state_lock(model).exclusive():
        targets = _targets(model)
        base = torch.stack([torch.stack([rows.detach() for rows in _rows(t)]) for t in targets]).clone()
        plugin.to(device=base.device)
        model.__dict__[_KEY] = Attachment(plugin, source, source, scale, base,
                                          stamps=[_stamp(t) for t in targets])
        set_plugin_hooks(model, PluginHooks(plugin.spec.method, _at_degree, detach, plugin.spec.mode))
        model.r = source
    return model


def _warn_if_adapted_elsewhere(plugin: CompensatorBank, model: nn.Module, source: int) -> None:
    """One line when an adapted plugin meets weights or a source degree it was not adapted to: it
    still works as a plugin, but what adaptation bought belongs to the other model."""
    adapted = plugin.spec.adapted
    if not adapted:
        return
    if adapted.get("weights_sha256") not in (None, weights_fingerprint(model)):
        warnings.warn(f"this plugin was adapted to another model ({adapted.get('checkpoint', '?')}, weights "
                      f"{adapted['weights_sha256'][:12]}); on these weights it is no better than the "
                      "universal plugin it started from, so adapt it to this model (tocom adapt)",
                      stacklevel=3)
    elif adapted.get("source") not in (None, source):
        warnings.warn(f"this plugin was adapted to source degree {adapted['source']}, not {source}; "
                      "adapt it again with --source", stacklevel=3)


@torch.no_grad()
def set_degree(model: nn.Module, target: int, scale: float | None = None) -> nn.Module:
    """Run the model at degree ``target``: sets ``model.r`` and folds delta(source -> target).

    Atomic with respect to forwards on other threads: it waits for running ones, and new ones
    wait for it. Weights are rebuilt from the pre-plugin rows, so switching never drifts.
    """
    attachment(model)  # a clear error before touching the lock of a model that may be unpatched
    with state_lock(model).exclusive():
        att = attachment(model)
        att.plugin.check_degree(target)
        scale = att.scale if scale is None else scale
        coeff = _coefficients(att, target, scale)
        targets = _targets(model)
        _sync_base(att, targets)
        _fold_or_restore(att, targets, coeff)
        att.degree, att.scale = target, scale
        model.r = target
    return model


def _fold_or_restore(att: Attachment, targets: list[Target], coeff: torch.Tensor | None) -> None:
    """:func:`_fold`, all or nothing: when it fails partway, the weights go back to the pre-plugin
    rows plus the delta folded before, so the model never runs half switched."""
    previous = att.applied
    try:
        _fold(att, targets, coeff)
    except BaseException:
        _fold(att, targets, previous)
        raise


@torch.no_grad()
def detach(model: nn.Module) -> nn.Module:
    """Remove the plugin: W_q and W_v lose its delta (bit for bit, unless changed meanwhile)."""
    attachment(model)
    with state_lock(model).exclusive():
        att = attachment(model)
        targets = _targets(model)
        _sync_base(att, targets)
        _fold(att, targets, None)
        del model.__dict__[_KEY]
        set_plugin_hooks(model, None)
        model.r = att.source
    return model


@contextmanager
def restoring(model: nn.Module) -> Iterator[nn.Module]:
    """Leave the model as it was found: patched or not, its degree, and its plugin's attachment,
    degree and scale (a plugin attached inside the block is detached on exit)."""
    was_patched = is_patched(model)
    r = model.r if was_patched else None
    before = model.__dict__.get(_KEY)
    degree, scale = (before.degree, before.scale) if before is not None else (None, None)
    try:
        yield model
    finally:
        now = model.__dict__.get(_KEY)
        if now is not None and now is not before:
            detach(model)
        if before is not None and model.__dict__.get(_KEY) is before:
            before.scale = scale
            set_degree(model, degree)
        if not was_patched:
            unpatch(model)
        elif is_patched(model):
            model.r = r


def is_attached(model: nn.Module) -> bool:
    """Whether a compensator is attached."""
    return _KEY in model.__dict__ and plugin_hooks(model) is not None

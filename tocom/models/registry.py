"""The supported backbone families and the entry points that dispatch to them.

Adding a family: write one file with an :class:`~tocom.models.adapter.Adapter` subclass and add
it to :func:`adapters`. Optional libraries (Hugging Face ``transformers``) are never imported here:
their adapter recognises models by class module name and imports the library lazily.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from torch import nn

from tocom.compress import (
    Schedule,
    ViTDims,
    clamp_schedule,
    dense_clamp,
    dense_model_flops,
    gflops,
    resolve_schedule,
    tokens_per_layer,
)
from tocom.models.adapter import Adapter
from tocom.models.blocks import COMPRESSION_METHODS, MODES, CompressionConfig
from tocom.models.state import drop_state, plugin_hooks, state_lock


@cache
def adapters() -> tuple[Adapter, ...]:
    """Every supported family, most specific first."""
    from tocom.models.beit import BeitAdapter
    from tocom.models.eva import EvaAdapter
    from tocom.models.hf_vit import HFViTAdapter
    from tocom.models.vit import TimmViTAdapter

    return (TimmViTAdapter(), EvaAdapter(), BeitAdapter(), HFViTAdapter())


def supported_families() -> str:
    """One line per family, for error messages and docs."""
    return "; ".join(f"{a.family}: {a.description}" for a in adapters())


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter serving ``model``; TypeError naming the class and the supported families."""
    for adapter in adapters():
        if adapter.claims(model):
            return adapter
    cls = type(model)
    raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a model tocom can compress; tocom supports "
                    f"these families: {supported_families()}")


def require_feature(model: nn.Module, feature: str, what: str) -> None:
    """ValueError when ``model``'s family lacks ``feature`` (see :data:`tocom.models.adapter.FEATURES`),
    naming ``what`` was asked and the families that have it."""
    adapter = adapter_for(model)
    if feature not in adapter.features:
        have = ", ".join(a.family for a in adapters() if feature in a.features)
        raise ValueError(f"{what} is not supported for {adapter.family} models ({type(model).__name__}) yet; "
                         f"it works on these families: {have}")


def family_of(model: nn.Module) -> str:
    """The family name recorded in compensator plugins (e.g. ``"timm-vit"``)."""
    return adapter_for(model).family


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has been applied."""
    return hasattr(model, "_tocom")


def patch(model: nn.Module, method: str = "tome", *, prop_attn: bool = True,
          trace_source: bool = False, fuse: bool = False, mode: str = "standard") -> nn.Module:
    """Make a supported ViT reduce tokens; set the degree with ``model.r = ...`` (default 0).

    Args:
        model: a model of any supported family (patched in place; see :func:`supported_families`).
        method: ``"tome"`` (merge similar tokens), ``"evit"`` (prune inattentive ones), ``"pitome"``
            (merge the most redundant tokens by energy, protect the rest) or ``"tofu"`` (prune matched
            tokens in early blocks, merge them norm-preservingly in later ones); see
            :mod:`tocom.compress` for each rule and its paper.
        mode: ``"standard"`` (tokens removed stay removed) or ``"dense"`` (ToMe only: each block
            merges r of its full-length input before the MLP and unmerges the MLP's output, so
            every patch keeps its own output token, for dense prediction; timm ViTs only for now).
        prop_attn: add ``log(size)`` of each key to the attention logits.
        trace_source: keep the token-to-patch map in ``model.last_state.source``.
        fuse: EViT only: fuse pruned tokens into one.

    Returns:
        the same model. Patching a patched model updates these options, with the same checks.
    """
    if method not in COMPRESSION_METHODS:
        raise ValueError(f"method must be one of {COMPRESSION_METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "dense" and method == "evit":
        raise ValueError("dense mode merges tokens and unmerges them after each MLP; evit prunes "
                         "tokens, which cannot be unmerged: use method='tome'")
    if mode == "dense" and method != "tome":
        raise ValueError(f"dense mode unmerges ToMe's merge plan after each MLP and has no {method} "
                         f"version: use method='tome', or mode='standard' for {method}")
    adapter = adapter_for(model)
    if not is_patched(model):
        adapter.check(model)
    if mode == "dense":
        require_feature(model, "dense", "mode='dense'")
    if method == "evit" and not adapter.has_class_token(model):
        raise ValueError("EViT ranks tokens by class-token attention; this model has no class token")
    if method != "tome" and any(hasattr(blk, "merge_modulator") for blk in adapter.blocks(model)):
        raise ValueError("this model has PYRA modulators, which only act on ToMe merges; "
                         f"call tocom.pyra.remove_pyra(model) before patching it for {method}")
    config = CompressionConfig(method, prop_attn, trace_source, fuse, mode, adapter.dims(model).depth)
    if is_patched(model):
        hooks = plugin_hooks(model)
        if hooks is not None and hooks.method != method:
            raise ValueError(f"a {hooks.method} compensator is attached to this model; "
                             f"tocom.detach(model) before patching it for {method}")
        if hooks is not None and hooks.mode != mode:
            raise ValueError(f"a compensator distilled in {hooks.mode} mode is attached to this model; "
                             f"tocom.detach(model) before patching it in {mode} mode")
        with state_lock(model).exclusive():
            adapter.reconfigure(model, config)
        return model
    adapter.patch(model, config)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (detaching any plugin first): classes, weights and outputs are restored."""
    if not is_patched(model):
        return model
    hooks = plugin_hooks(model)
    if hooks is not None:
        hooks.detach(model)
    with state_lock(model).exclusive():
        adapter_for(model).unpatch(model)
    drop_state(model)
    return model


def dims_of(model: nn.Module) -> ViTDims:
    """Shape facts of a supported ViT for FLOPs and schedules."""
    return adapter_for(model).dims(model)


def schedule_report(model: nn.Module, r: Schedule | None = None, mode: str | None = None) -> dict[str, Any]:
    """Tokens per block and analytic GFLOPs of a supported ViT at schedule ``r`` (default: ``model.r``).

    ``mode`` (default: the patched model's, else ``"standard"``) decides the cost: in ``"dense"``
    mode attention runs on every token and each MLP on ``N - r`` of them.

    Returns:
        ``{"schedule": effective per-block r, "tokens": length after each block (its attention's
        length in the next block), "mlp_tokens": tokens each MLP runs on, "gflops": per image,
        "gflops_ratio": vs r = 0, "mode"}``.
    """
    dims = dims_of(model)
    r = (model.r if is_patched(model) else 0) if r is None else r
    mode = (model._tocom.mode if is_patched(model) else "standard") if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n, p = dims.num_tokens, dims.num_prefix
    full = gflops(dims, [0] * dims.depth)
    if mode == "dense":
        schedule = dense_clamp(resolve_schedule(r, dims.depth), n, p)
        cost = dense_model_flops(dims, schedule) / 1e9
        return {"schedule": schedule, "tokens": [n] * dims.depth, "mlp_tokens": [n - k for k in schedule],
                "gflops": cost, "gflops_ratio": cost / full, "mode": mode}
    schedule = clamp_schedule(resolve_schedule(r, dims.depth), n, p)
    tokens = tokens_per_layer(schedule, n, p)
    return {"schedule": schedule, "tokens": tokens, "mlp_tokens": tokens, "gflops": gflops(dims, schedule),
            "gflops_ratio": gflops(dims, schedule) / full, "mode": mode}

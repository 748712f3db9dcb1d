"""Does a plugin fit a model? Family and shapes read off the model through its adapter, mismatches named.

A plugin is a low-rank delta per block on W_q and W_v, so it carries over between families that
share the block (:data:`CARRY_OVER`): a timm ``VisionTransformer`` and a Hugging Face ViT of the same
architecture (depth, width, heads, attention dim and protected prefix tokens) take the same plugin.
Both fold it into weight rows only (timm's fused ``qkv`` rows, HF's ``q_proj`` / ``v_proj``); the
q and v biases are never touched, so fold and unfold are exact in both.
"""

from __future__ import annotations

from torch import nn

from tocom.compensator.bank import PluginSpec
from tocom.models import adapter_for


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def spec_for(model: nn.Module, **kwargs) -> PluginSpec:
    """A :class:`PluginSpec` for ``model`` (any supported family); ``kwargs`` set groups, rank, scale,
    method, variant, arch, mode."""
    adapter = adapter_for(model)
    dims = adapter.dims(model)
    arch = kwargs.pop("arch", None) or _arch_name(model)
    return PluginSpec(arch=arch, embed_dim=dims.embed_dim, depth=dims.depth,
                      num_heads=adapter.num_heads(model), attn_dim=dims.attn_dim, family=adapter.family,
                      num_prefix=dims.num_prefix, **kwargs)


def check_mode(spec: PluginSpec, model: nn.Module) -> None:
    """Raise ValueError when a patched ``model`` runs another compression mode than ``spec`` was
    distilled in (a standard plugin compensates shortened sequences, a dense one full-length ones)."""
    config = getattr(model, "_tocom", None)
    if config is not None and config.mode != spec.mode:
        raise ValueError(f"the plugin was distilled in {spec.mode} mode but the model is patched in "
                         f"{config.mode} mode; use a plugin distilled in {config.mode} mode "
                         f"(tocom distill --mode {config.mode}) or tocom.patch(model, mode={spec.mode!r})")


# Families whose blocks are the same computation (pre-norm ViT block, q and v as plain Linear maps of
# the normalised tokens), so a plugin trained on one serves the other.
CARRY_OVER = frozenset({"timm-vit", "hf-vit"})


def check_fits(spec: PluginSpec, model: nn.Module) -> None:
    """Raise ValueError naming every way ``spec`` does not fit ``model``."""
    here = spec_for(model)
    if spec.family != here.family and not {spec.family, here.family} <= CARRY_OVER:
        raise ValueError(f"plugin for {spec.arch} was trained on a {spec.family} model; this {here.arch} is "
                         f"a {here.family} model. Use a plugin trained for this model family.")
    problems = [
        f"{what} {getattr(spec, field)}, model has {getattr(here, field)}"
        for field, what in (("depth", "depth"), ("embed_dim", "embed dim"),
                            ("num_heads", "heads"), ("attn_dim", "attention dim"),
                            ("num_prefix", "prefix tokens"))
        # a file that predates num_prefix cannot be checked for it
        if getattr(spec, field) is not None and getattr(spec, field) != getattr(here, field)
    ]
    if problems:
        raise ValueError(
            f"plugin for {spec.arch} does not fit this {here.arch}: plugin was trained for "
            + "; ".join(problems) + ". Use a plugin trained for this architecture."
        )

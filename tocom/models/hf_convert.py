"""timm ViT weights -> a Hugging Face ``ViTForImageClassification`` (for example DeiT-Tiny).

:func:`from_timm` takes a timm ``VisionTransformer`` (or its state dict) with class-token pooling and
no other prefix token (``deit_*_patch16_224``, ``vit_*_patch16_224``) and builds the
``transformers`` model of the same layout, as ``facebook/deit-tiny-patch16-224`` is laid out
(``ViTConfig``: LayerNorm eps 1e-6, exact GELU, q/k/v biases, SDPA attention). Every tensor is
copied, none recomputed: timm's fused ``qkv`` splits into ``q_proj`` / ``k_proj`` / ``v_proj`` by
rows, so the two models compute the same function and a compensator plugin folds into the same
rows of either (:mod:`tocom.compensator.fit`). The result is an ordinary ``transformers`` model:
``save_pretrained`` / ``from_pretrained`` work on it without the hub. :func:`processor_config` gives
the image processor that reproduces the timm model's evaluation transform, so a folder written with
both preprocesses as timm does (``facebook/deit-tiny-patch16-224``'s own processor squashes to
256 x 256 before its crop, which is not timm's transform).

Refused with one line naming what is in the way: distillation or register tokens, layer scale,
q/k norms, average / attention pooling (``fc_norm``, ``attn_pool``), a pre-norm, position
embeddings without a class slot, and a ``config`` whose shapes disagree with the weights.
``transformers`` is imported only when this module is used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
# timm block key (after "blocks.N.") -> HF layer key (after "vit.layers.N."); qkv is split apart.
_LAYER_KEYS = {
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP_KEYS = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
    "head.weight": "classifier.weight", "head.bias": "classifier.bias",
}
# What a timm ViT may hold that a ViTForImageClassification cannot express, and why.
_UNMAPPABLE = {
    "dist_token": "a distillation token",
    "reg_token": "register tokens",
    "fc_norm.": "average pooling with fc_norm (HF's ViT pools the class token)",
    "attn_pool.": "attention pooling",
    "norm_pre.": "a norm before the blocks",
    ".ls1.": "layer scale",
    ".q_norm.": "q/k norms",
    "head_dist.": "a distillation head",
}


def _refuse_unmappable(state: Mapping[str, torch.Tensor]) -> None:
    for key in state:
        for marker, what in _UNMAPPABLE.items():
            if marker in key:
                raise ValueError(f"this timm ViT has {what} (key {key!r}); from_timm converts only "
                                 "class-token ViTs such as deit_tiny_patch16_224 or vit_*_patch16_224")


def _timm_facts(model: nn.Module) -> dict:
    """Checks only a live timm model allows (a state dict does not record them) and its head count."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError("from_timm takes a timm VisionTransformer or its state dict, "
                        f"got {type(model).__name__}")
    if model.global_pool != "token" or model.num_prefix_tokens != 1:
        raise ValueError(f"this timm ViT pools by {model.global_pool!r} with {model.num_prefix_tokens} "
                         "prefix tokens; from_timm converts only class-token pooling with one class token")
    blk = model.blocks[0]
    act = getattr(blk.mlp, "act", None)
    if not isinstance(act, nn.GELU) or act.approximate != "none":
        raise ValueError(f"this timm ViT's MLP uses {type(act).__name__}, not exact GELU; "
                         "from_timm converts only GELU ViTs")
    return {"num_heads": blk.attn.num_heads, "layer_norm_eps": blk.norm1.eps}


def vit_config(state: Mapping[str, torch.Tensor], num_heads: int, layer_norm_eps: float = 1e-6,
               id2label: Mapping[int, str] | None = None):
    """The ``transformers.ViTConfig`` whose shapes the timm state dict ``state`` has."""
    from transformers import ViTConfig

    hidden = state["cls_token"].shape[-1]
    conv = state["patch_embed.proj.weight"]  # (C, 3, p, p)
    patch = conv.shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid * grid != state["pos_embed"].shape[1] - 1 or conv.shape[-2] != patch:
        raise ValueError(f"pos_embed holds {state['pos_embed'].shape[1]} positions and the patches are "
                         f"{tuple(conv.shape[-2:])}: from_timm needs a square grid, square patches and one "
                         "class-token position")
    if hidden % num_heads:
        raise ValueError(f"embed dim {hidden} does not split into {num_heads} heads; "
                         "pass the model's num_heads")
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.fullmatch, state) if m)
    labels = state["head.weight"].shape[0] if "head.weight" in state else 0
    if id2label is not None and len(id2label) != labels:
        raise ValueError(f"id2label names {len(id2label)} classes but the head has {labels}")
    kwargs = {"id2label": dict(id2label)} if id2label is not None else {"num_labels": labels}
    return ViTConfig(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=num_heads,
                     intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0], hidden_act="gelu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=layer_norm_eps,
                     image_size=grid * patch, patch_size=patch, num_channels=conv.shape[1], qkv_bias=True,
                     **kwargs)


def hf_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm key -> HF ``ViTForImageClassification`` key for every tensor; qkv split by rows."""
    _refuse_unmappable(state)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        block = _BLOCK.fullmatch(key)
        if block is None:
            if key in _TOP_KEYS:
                out[_TOP_KEYS[key]] = value
            else:
                unknown.append(key)
            continue
        i, rest = block.groups()
        prefix = f"vit.layers.{i}."
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.{name}.{kind}"] = part
        elif rest in _LAYER_KEYS:
            out[prefix + _LAYER_KEYS[rest]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"from_timm cannot map timm keys {unknown[:4]}; it converts only class-token ViTs "
                         "such as deit_tiny_patch16_224 or vit_*_patch16_224")
    return out


def from_timm(source: nn.Module | Mapping[str, torch.Tensor], *, config=None, num_heads: int | None = None,
              id2label: Mapping[int, str] | None = None) -> nn.Module:
    """A ``transformers.ViTForImageClassification`` (SDPA attention, eval mode) holding the weights of a
    timm class-token ViT.

    Args:
        source: a timm ``VisionTransformer`` or its state dict (timm key names).
        config: a ``ViTConfig`` to build; its shapes must match the weights (default: derived from them).
        num_heads: attention heads, needed for a state dict without ``config`` (it does not record them).
        id2label: class names, ``{index: name}`` (default: HF's ``LABEL_i``).

    Raises:
        ValueError: one line naming what cannot be mapped or what disagrees.
    """
    from transformers import ViTForImageClassification

    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    _refuse_unmappable(state)  # first: it names the part in the way most precisely
    facts = _timm_facts(source) if isinstance(source, nn.Module) else {}
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
               if k not in state]
    if missing:
        raise ValueError(f"this is not a timm ViT state dict: it lacks {', '.join(missing)}")
    heads = facts.get("num_heads", num_heads)
    if heads is None and config is None:
        raise ValueError("a state dict does not record the number of heads: pass num_heads= "
                         "(3 for DeiT-Tiny) or config=")
    derived = vit_config(state, config.num_attention_heads if config is not None else heads,
                         facts.get("layer_norm_eps", 1e-6), id2label)
    if config is None:
        config = derived
    else:
        fields = ("hidden_size", "num_hidden_layers", "intermediate_size", "image_size", "patch_size",
                  "num_channels", "num_labels")
        wrong = [f"{f} {getattr(config, f)}, weights have {getattr(derived, f)}" for f in fields
                 if getattr(config, f) != getattr(derived, f)]
        if wrong:
            raise ValueError("config does not match the timm weights: " + "; ".join(wrong))
        if id2label is not None:
            config.id2label = dict(id2label)
    config._attn_implementation = "sdpa"
    model = ViTForImageClassification(config)
    with torch.no_grad():
        tensors = hf_state(state)
        model.load_state_dict({k: v.detach().clone().contiguous() for k, v in tensors.items()}, strict=True)
    return model.eval()


def processor_config(model: nn.Module) -> dict:
    """The ``preprocessor_config.json`` fields that reproduce a timm model's evaluation transform.

    timm resizes the shorter side to ``floor(size / crop_pct)``, centre-crops ``size`` and
    normalises with the model's mean and std; a ``BitImageProcessor`` with ``shortest_edge`` does
    the same, and :func:`tocom.data.transforms.hf_record` reads it back exactly. Write it with
    ``transformers.BitImageProcessor(**processor_config(model)).save_pretrained(folder)``.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}.get(cfg["interpolation"])
    if resample is None:
        raise ValueError(f"timm interpolation {cfg['interpolation']!r} has no Pillow code for an HF "
                         "image processor")
    return {"do_resize": True, "size": {"shortest_edge": math.floor(size / cfg["crop_pct"])},
            "resample": resample, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(cfg["mean"]), "image_std": list(cfg["std"]), "do_convert_rgb": True}

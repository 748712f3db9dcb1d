"""Parameter-efficient fine-tuning of Hugging Face ViTs (``hf:`` models, :mod:`tocom.models.hf_load`).

LoRA is the ``peft`` library's own: a ``LoraConfig`` on the layers' separate ``q_proj`` /
``k_proj`` / ``v_proj`` Linears, ``get_peft_model`` to add it and ``merge_and_unload`` to fold
it into plain weights, so the result is an ordinary ``transformers`` model. tocom's token
reduction calls those Linears as modules, so a patched model trains with LoRA at any degree.

AdaptFormer is tocom's (:mod:`tocom.peft.adaptformer`), put into each HF layer's slots exactly as
for timm: the layer's MLP norm (``layernorm_after`` for ViT/DeiT, ``norm2`` for DINOv2,
``layer_norm2`` for CLIP/SigLIP) becomes ``Identity`` and its ``mlp`` the parallel adapter, which
applies that norm itself. Both HF's own layer forward and tocom's reducing one pick it up.

``peft`` and ``transformers`` are imported only when LoRA is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from tocom.models import adapter_for
from tocom.models.hf_load import HEAD_NAMES

from .adaptformer import BottleneckAdapter, ParallelAdapterMLP
from .config import QKV_SLICES, AdaptFormerConfig, LoRAConfig

MLP_NORMS = ("layernorm_after", "norm2", "layer_norm2")  # ViT/DeiT, DINOv2, CLIP/SigLIP
HF_METHODS = ("full", "lora", "adaptformer")


class HFParallelAdapterMLP(ParallelAdapterMLP):
    """:class:`ParallelAdapterMLP` in an HF layer; attributes it lacks (``fc1``, ``fc2``) are the
    wrapped MLP's, so code that reads an HF MLP's shape sees through the adapter."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("mlp")
            if inner is None:
                raise
            return getattr(inner, name)


def hf_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of an HF model tocom supports (patched or not), in order."""
    adapter = adapter_for(model)
    if adapter.family != "hf-vit":
        raise TypeError(f"{type(model).__name__} is not a Hugging Face ViT; use tocom.peft's timm functions")
    return adapter.blocks(model)


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier Linears of an HF image classifier (two for DeiT with teacher)."""
    heads = [getattr(model, name) for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if not heads:
        raise TypeError(f"{type(model).__name__} has no classifier head ({', '.join(HEAD_NAMES)}); "
                        "fine-tune an ...ForImageClassification model")
    return heads


def lora_target_modules(targets: Sequence[str]) -> list[str]:
    """peft ``target_modules`` for tocom's LoRA targets: ``("q", "v")`` -> ``["q_proj", "v_proj"]``."""
    config = LoRAConfig(targets=tuple(targets))  # validates and orders the targets
    return [f"{t}_proj" for t in config.targets]


def add_hf_lora(model: nn.Module, rank: int = 8, targets: Sequence[str] = QKV_SLICES,
                alpha: float | None = None, dropout: float = 0.0, head: bool = True) -> nn.Module:
    """The ``peft`` LoRA model of an HF ViT: only the LoRA matrices (and with ``head`` the classifier)
    train. Outputs equal the model's until training moves LoRA's B off zero.

    Returns the ``peft.PeftModel``; :func:`merge_hf_lora` folds it back into the HF model.
    """
    config = LoRAConfig(rank=rank, targets=tuple(targets), alpha=alpha, dropout=dropout)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError('LoRA on hf: models needs the peft library; pip install "tocom[hf]"') from None
    hf_layers(model)  # refuses non-HF models before peft wraps anything
    lora = LoraConfig(r=config.rank, lora_alpha=config.scaling * config.rank, lora_dropout=config.dropout,
                      target_modules=lora_target_modules(config.targets), bias="none")
    peft_model = get_peft_model(model, lora)  # freezes everything but the LoRA matrices
    if head:
        for module in head_modules(model):
            module.requires_grad_(True)
    return peft_model


def merge_hf_lora(model: nn.Module) -> nn.Module:
    """``merge_and_unload`` of a :func:`add_hf_lora` model: the HF model with LoRA folded in."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def add_hf_adaptformer(model: nn.Module, bottleneck: int = 32, scale: float = 0.1) -> nn.Module:
    """An AdaptFormer adapter parallel to every HF layer's MLP (in place); returns ``model``.

    Each layer computes ``x + MLP(LN(x)) + s * adapter(x)`` (DINOv2: both scaled by its layer
    scale, as for timm). Outputs are unchanged right after this call (W_up starts at zero).
    """
    config = AdaptFormerConfig(bottleneck=bottleneck, scale=scale)
    layers = hf_layers(model)
    if any(isinstance(layer.mlp, ParallelAdapterMLP) for layer in layers):
        raise ValueError("model already has AdaptFormer adapters")
    for i, layer in enumerate(layers):
        norm_name = next((n for n in MLP_NORMS if isinstance(getattr(layer, n, None), nn.LayerNorm)), None)
        if norm_name is None or not isinstance(getattr(layer, "mlp", None), nn.Module):
            raise TypeError(f"layer {i} of {type(model).__name__} has no MLP norm ({', '.join(MLP_NORMS)}) "
                            "and mlp")
        norm = getattr(layer, norm_name)
        ref = next(layer.mlp.parameters())
        adapter = BottleneckAdapter(norm.normalized_shape[0], config.bottleneck, device=ref.device,
                                    dtype=ref.dtype)
        layer.mlp = HFParallelAdapterMLP(norm, layer.mlp, adapter, config.scale)
        setattr(layer, norm_name, nn.Identity())
    return model


def adaptformer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`add_hf_adaptformer` added."""
    return [p for layer in hf_layers(model) if isinstance(layer.mlp, ParallelAdapterMLP)
            for p in layer.mlp.adapter.parameters()]


def train_only(model: nn.Module, params: Sequence[nn.Parameter], head: bool = True) -> nn.Module:
    """Freeze everything but ``params`` (and with ``head`` the classifier); returns ``model``."""
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if head:
        for module in head_modules(model):
            module.requires_grad_(True)
    return model


def prepare_from_metadata(model: nn.Module, meta: dict[str, str]) -> None:
    """Add the modules a ``tocom finetune hf:...`` checkpoint holds (its metadata says which)."""
    import json

    method = meta.get("method")
    if method == "adaptformer":
        peft = json.loads(meta.get("peft", "{}"))
        if not (isinstance(peft.get("bottleneck"), int) and isinstance(peft.get("scale"), (int, float))):
            raise ValueError("the checkpoint's peft metadata lacks an int bottleneck and a numeric scale for "
                             "AdaptFormer; re-export the checkpoint")
        add_hf_adaptformer(model, peft["bottleneck"], peft["scale"])
    elif method == "pyra":
        raise ValueError("PYRA is not supported for hf: models; this checkpoint cannot be loaded as one")


def load_finetuned_hf(name: str, checkpoint: str | None = None) -> nn.Module:
    """``hf:PATH``, or a ``tocom finetune hf:PATH`` checkpoint of it with its adapters, unpatched and
    returning logits (:func:`tocom.models.hf_load.load_hf`)."""
    from tocom.models.hf_load import load_hf

    return load_hf(name, checkpoint, prepare=prepare_from_metadata)

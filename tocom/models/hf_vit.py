"""Adapter for Hugging Face ``transformers`` ViTs: ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP
vision towers.

``transformers`` is optional (``pip install tocom[hf]``): models are recognised by their class's
module name and the library is imported only when a model is patched. The layer loop of each
model lives in one module, its *owner*: ``ViTModel`` / ``DeiTModel`` themselves, or the
``encoder`` of DINOv2, CLIP and SigLIP. Patching swaps the owner's class for one whose forward
reduces tokens between attention and MLP (proportional attention through SDPA, the same
prefix-token rules as timm: class, distillation and register tokens are protected), and swaps
the class of the model you passed for one whose ``model.r`` sets the owner's schedule.
DINOv2's classifier averages patch tokens; that average is size-weighted. SigLIP's attention
pooling head sees the merged tokens unweighted (as for timm's attention pooling).
Attention masks are refused: they do not survive token reduction.

Adapter features (:mod:`tocom.models.adapter`): none of the optional ones yet. ``model.r`` switches
under the state lock and compensators fold into ``q_proj`` / ``v_proj`` (attach, set_degree,
detach), but there is no per-call degree (``model(pixel_values, r=t)`` is refused), so compensator
distillation and ``mode="dense"`` are refused for these models: distil on the timm port of the model.
"""

from __future__ import annotations

from functools import reduce as _fold

import torch
from torch import nn

from tocom.compress import ViTDims, initial_source
from tocom.models.adapter import (
    Adapter,
    Projection,
    QVProjections,
    attend,
    need_for,
    reduce,
    restore_class,
    swap_class,
    weighted_mean,
)
from tocom.models.blocks import CompressionConfig, TokenState
from tocom.models.state import CompressedMixin, drop_state, init_state, refuse_masks, state_lock

# Class name -> (path of the module that owns the layer loop, path of the embeddings module).
_MODELS = {
    "ViTModel": ("", "embeddings"),
    "ViTForImageClassification": ("vit", "vit.embeddings"),
    "DeiTModel": ("", "embeddings"),
    "DeiTForImageClassification": ("deit", "deit.embeddings"),
    "DeiTForImageClassificationWithTeacher": ("deit", "deit.embeddings"),
    "Dinov2Model": ("encoder", "embeddings"),
    "Dinov2ForImageClassification": ("dinov2.encoder", "dinov2.embeddings"),
    "Dinov2WithRegistersModel": ("encoder", "embeddings"),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers.encoder",
                                                  "dinov2_with_registers.embeddings"),
    "CLIPVisionModel": ("encoder", "embeddings"),
    "CLIPVisionModelWithProjection": ("vision_model.encoder", "vision_model.embeddings"),
    "CLIPForImageClassification": ("vision_model.encoder", "vision_model.embeddings"),
    "SiglipVisionModel": ("encoder", "embeddings"),
    "SiglipForImageClassification": ("vision_model.encoder", "vision_model.embeddings"),
}


def _get(model: nn.Module, path: str) -> nn.Module:
    return _fold(getattr, path.split("."), model) if path else model


def _layers(owner: nn.Module) -> nn.ModuleList:
    return owner.layers if hasattr(owner, "layers") else owner.layer


def _parts(layer: nn.Module):
    """(norm1, attention, post-attention dropout, ls1, norm2, post-MLP dropout, ls2) of any HF ViT layer."""
    if hasattr(layer, "layernorm_before"):  # ViT, DeiT
        return (layer.layernorm_before, layer.attention, layer.dropout, None,
                layer.layernorm_after, layer.dropout, None)
    if hasattr(layer, "layer_scale1"):  # DINOv2
        return (layer.norm1, layer.attention, layer.drop_path, layer.layer_scale1,
                layer.norm2, layer.drop_path, layer.layer_scale2)
    return layer.layer_norm1, layer.self_attn, None, None, layer.layer_norm2, None, None  # CLIP, SigLIP


def _heads(attn: nn.Module) -> int:
    return getattr(attn, "num_attention_heads", None) or attn.num_heads


def hf_attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, need: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF self-attention (q/k/v Linears, SDPA) with proportional attention: (B, N, C) -> (B, N, C)."""
    batch, n, _ = x.shape
    q, k, v = (proj(x).view(batch, n, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    scale = getattr(attn, "scaling", None) or attn.scale
    dropout = getattr(attn, "attention_dropout", None)
    dropout = getattr(attn, "dropout", 0.0) if dropout is None else dropout
    out, metric = attend(q, k, v, size, need, dropout_p=dropout if attn.training else 0.0, scale=scale)
    out = out.transpose(1, 2).reshape(batch, n, -1).contiguous()
    return (attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj)(out), metric


def hf_layer(layer: nn.Module, x: torch.Tensor, r: int, size: torch.Tensor | None,
             source: torch.Tensor | None, num_prefix: int, config: CompressionConfig, index: int):
    """HF ViT layer ``index`` removing ``r`` tokens after attention. Returns ``(x, size, source)``."""
    norm1, attn, drop1, ls1, norm2, drop2, ls2 = _parts(layer)
    out, metric = hf_attention(attn, norm1(x), size if config.prop_attn else None, need_for(config, r))
    out = ls1(out) if ls1 is not None else out
    x = (drop1(out) if drop1 is not None else out) + x
    x, size, source, _ = reduce(x, metric, r, size, source, num_prefix, config,
                                getattr(layer, "merge_modulator", None), layer=index)
    out = layer.mlp(norm2(x))
    out = ls2(out) if ls2 is not None else out
    return (drop2(out) if drop2 is not None else out) + x, size, source


class CompressedOwnerMixin(CompressedMixin):
    """The module holding the layer loop of a patched HF model (it shares the model's state lock)."""

    def _tocom_depth(self) -> int:
        return len(_layers(self))

    def _tocom_num_prefix(self) -> int:
        return self._tocom_prefix

    def _tocom_num_tokens(self) -> int:
        return self._tocom_tokens

    def run_layers(self, x: torch.Tensor, attention_mask=None) -> tuple[torch.Tensor, TokenState]:
        """Tokens (B, N, C) through every layer -> (B, N_L, C) and their :class:`TokenState`."""
        refuse_masks(attention_mask)
        with state_lock(self).shared():  # degree and weights stay put until this forward ends
            config: CompressionConfig = self._tocom
            batch, n, _ = x.shape
            npt = self._tocom_prefix
            state = TokenState(None, None, npt, self.effective_schedule(n))
            if config.trace_source:
                state.source = initial_source(batch, n, x.device, x.dtype)
            for i, (layer, r) in enumerate(zip(_layers(self), state.schedule)):
                x, state.size, state.source = hf_layer(layer, x, r, state.size, state.source, npt, config, i)
                state.tokens.append(x.shape[1])
        self.last_state = state  # for inspection only (the latest forward of any thread)
        return x, state


class CompressedEncoderMixin(CompressedOwnerMixin):
    """``Dinov2Encoder`` / ``CLIPEncoder`` / ``SiglipEncoder`` forward."""

    def forward(self, hidden_states=None, attention_mask=None, inputs_embeds=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        x = hidden_states if hidden_states is not None else inputs_embeds
        return BaseModelOutput(last_hidden_state=self.run_layers(x, attention_mask)[0])


class CompressedViTModelMixin(CompressedOwnerMixin):
    """``ViTModel`` / ``DeiTModel`` forward: embeddings, layers, final norm, pooler."""

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
                attention_mask=None, r=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        _refuse_per_call(r)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos,
                            interpolate_pos_encoding=interpolate_pos_encoding)
        x = self.layernorm(self.run_layers(x, attention_mask)[0])
        pooled = self.pooler(x) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


def _refuse_per_call(r) -> None:
    if r is not None:
        raise ValueError("a per-call degree is not supported for Hugging Face models (hf-vit) yet; "
                         "set model.r (or tocom.set_degree with a plugin) instead")


class CompressedTopMixin:
    """The model the user passed, when it is not the owner: ``model.r`` reaches the owner, and a
    forward holds the shared state lock from embeddings to head."""

    def _tocom_owner(self) -> nn.Module:
        return _get(self, self._tocom_owner_path)

    @property
    def r(self):
        return self._tocom_owner().r

    @r.setter
    def r(self, value) -> None:
        self._tocom_owner().r = value

    @property
    def last_state(self) -> TokenState | None:
        return getattr(self._tocom_owner(), "last_state", None)

    def effective_schedule(self, num_tokens: int | None = None, r=None) -> list[int]:
        return self._tocom_owner().effective_schedule(num_tokens, r)

    def forward(self, *args, r=None, **kwargs):
        _refuse_per_call(r)
        with state_lock(self).shared():
            return super().forward(*args, **kwargs)


class CompressedDinov2ClassifierMixin(CompressedTopMixin):
    """DINOv2 classifier: class token and the size-weighted mean of the patch tokens."""

    def forward(self, pixel_values=None, labels=None, attention_mask=None, r=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        _refuse_per_call(r)
        backbone = _get(self, self._tocom_owner_path.rsplit(".", 1)[0])
        with state_lock(self).shared():
            x, state = self._tocom_owner().run_layers(backbone.embeddings(pixel_values), attention_mask)
        seq = backbone.layernorm(x)
        npt = state.num_prefix
        size = state.size
        patches = weighted_mean(seq[:, npt:], None if size is None else size[:, npt:])
        logits = self.classifier(torch.cat([seq[:, 0], patches], dim=1))
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits)


def _num_prefix(model: nn.Module, name: str) -> int:
    if name.startswith("Siglip"):
        return 0
    if name.startswith("DeiT"):
        return 2
    if name.startswith("Dinov2WithRegisters"):
        return 1 + model.config.num_register_tokens
    return 1


class HFViTAdapter(Adapter):
    family = "hf-vit"
    description = ("Hugging Face transformers " + ", ".join(sorted(_MODELS)))
    features = frozenset()

    def claims(self, model: nn.Module) -> bool:
        cls = getattr(type(model), "_tocom_base", type(model))
        return cls.__module__.startswith("transformers.") and cls.__name__ in _MODELS

    def _name(self, model: nn.Module) -> str:
        return getattr(type(model), "_tocom_base", type(model)).__name__

    def check(self, model: nn.Module) -> None:
        owner = _get(model, _MODELS[self._name(model)][0])
        for i, layer in enumerate(_layers(owner)):
            if getattr(_parts(layer)[1], "num_key_value_groups", 1) != 1:
                raise TypeError(f"{type(model).__name__} layer {i} uses grouped-query attention; "
                                "tocom does not support it")

    def patch(self, model: nn.Module, config: CompressionConfig) -> None:
        name = self._name(model)
        owner_path = _MODELS[name][0]
        owner = _get(model, owner_path)
        mixin = CompressedViTModelMixin if hasattr(owner, "embeddings") else CompressedEncoderMixin
        swap_class(owner, mixin)
        init_state(owner, config)
        dims = self.dims(model)
        owner._tocom_prefix, owner._tocom_tokens = dims.num_prefix, dims.num_tokens
        if owner is not model:
            dinov2_head = name.startswith("Dinov2") and "Classification" in name
            swap_class(model, CompressedDinov2ClassifierMixin if dinov2_head else CompressedTopMixin)
            model._tocom_lock, model._tocom = owner._tocom_lock, config
            model._tocom_owner_path = owner_path

    def reconfigure(self, model: nn.Module, config: CompressionConfig) -> None:
        model._tocom = config
        _get(model, _MODELS[self._name(model)][0])._tocom = config

    def unpatch(self, model: nn.Module) -> None:
        owner = _get(model, _MODELS[self._name(model)][0])
        restore_class(owner)
        drop_state(owner, ("_tocom_prefix", "_tocom_tokens"))
        restore_class(model)
        model.__dict__.pop("_tocom_owner_path", None)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_layers(_get(model, _MODELS[self._name(model)][0])))

    def has_class_token(self, model: nn.Module) -> bool:
        return _num_prefix(model, self._name(model)) > 0

    def dims(self, model: nn.Module) -> ViTDims:
        name = self._name(model)
        owner_path, embed_path = _MODELS[name]
        layers = _layers(_get(model, owner_path))
        attn = _parts(layers[0])[1]
        embeddings = _get(model, embed_path)
        conv = embeddings.patch_embeddings.projection if hasattr(embeddings, "patch_embeddings") \
            else embeddings.patch_embedding
        mlp = layers[0].mlp
        hidden = mlp.fc2.in_features if hasattr(mlp, "fc2") else mlp.down_proj.in_features * 3 // 2
        config = getattr(model.config, "vision_config", model.config)
        grid = config.image_size // config.patch_size
        return ViTDims(depth=len(layers), embed_dim=conv.out_channels, mlp_hidden=hidden,
                       num_patches=grid * grid, num_prefix=_num_prefix(model, name),
                       patch_size=config.patch_size, in_chans=conv.in_channels,
                       num_classes=getattr(model.config, "num_labels", 0) if "Classification" in name else 0,
                       attn_dim=_heads(attn) * attn.head_dim)

    def num_heads(self, model: nn.Module) -> int:
        return _heads(_parts(_layers(_get(model, _MODELS[self._name(model)][0]))[0])[1])

    def qv_projections(self, model: nn.Module) -> list[QVProjections]:
        layers = _layers(_get(model, _MODELS[self._name(model)][0]))
        return [QVProjections(Projection(_parts(layer)[1], "q_proj", slice(None)),
                              Projection(_parts(layer)[1], "v_proj", slice(None))) for layer in layers]

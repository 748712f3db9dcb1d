"""Adapter for Hugging Face ``transformers`` ViTs: ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP
vision towers.

``transformers`` is optional (``pip install tocom[hf]``): models are recognised by their class's
module name and the library is imported only when a model is patched. The layer loop of each
model lives in one module, its *owner*: ``ViTModel`` / ``DeiTModel`` themselves, or the
``encoder`` of DINOv2, CLIP and SigLIP. Patching swaps the owner's class for one whose layers
reduce tokens between attention and MLP (proportional attention through SDPA, the same
prefix-token rules as timm: class, distillation and register tokens are protected), and swaps
the class of the model you passed for one that runs embeddings, layers and head itself, so that a
call can carry its own degree and q/v delta down to the layers. Heads that average tokens
(DINOv2's patch mean, CLIP's and SigLIP's classifiers) weight them by size; SigLIP's attention
pooling head sees the merged tokens unweighted (as for timm's attention pooling).
Attention masks are refused: they do not survive token reduction; so are ``output_attentions``
and ``output_hidden_states``, which a patched model does not record.

Adapter features (:mod:`tocom.models.adapter`): ``per_call``, in Hugging Face's calling
convention: ``model(pixel_values, r=t)`` returns the model's own output type (``.logits``,
``.pooler_output``, ...), and

- ``model.forward_tokens(pixel_values, r=t, qv_delta=d) -> (last_hidden_state, TokenState)``,
- ``model.forward_head(last_hidden_state, pre_logits=False, size=state.size) -> tensor``

split it as timm does (logits of a classifier, else the pooled output; ``pre_logits`` gives the
features the classifier reads), so compensator distillation trains through these models. The
per-call delta is added to the outputs of ``q_proj`` and ``v_proj``, bias included, which is where
a folded delta acts: ``(W + dW) x + b = W x + b + dW x``. Not ``dense`` (refused).
"""

from __future__ import annotations

import inspect
from functools import reduce as _fold

import torch
from torch import nn

from tocom.compress import Schedule, ViTDims, initial_source
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
from tocom.models.blocks import CompressionConfig, QVDelta, TokenState
from tocom.models.state import (
    CompressedMixin,
    drop_state,
    init_state,
    refuse_masks,
    require_sizes,
    state_lock,
    with_plugin,
)

# Class name -> path of its vision backbone, the module holding the embeddings ("" for the model).
_MODELS = {
    "ViTModel": "",
    "ViTForImageClassification": "vit",
    "DeiTModel": "",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "",
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": "",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
    "CLIPVisionModel": "",
    "CLIPVisionModelWithProjection": "vision_model",
    "CLIPForImageClassification": "vision_model",
    "SiglipVisionModel": "",
    "SiglipForImageClassification": "vision_model",
}


def _get(model: nn.Module, path: str) -> nn.Module:
    return _fold(getattr, path.split("."), model) if path else model


def _owner_path(name: str, model: nn.Module) -> str:
    """Path of the module holding the layer loop: the backbone (ViT, DeiT) or its ``encoder``."""
    backbone = _MODELS[name]
    if not hasattr(_get(model, backbone), "encoder"):
        return backbone
    return f"{backbone}.encoder" if backbone else "encoder"


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


def hf_attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, need: str | None,
                 qv: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF self-attention (q/k/v Linears, SDPA) with proportional attention: (B, N, C) -> (B, N, C).

    ``qv``: (dq, dv), each (B, N, attn_dim), added to the outputs of ``q_proj`` and ``v_proj``
    (a per-call delta acts where a folded one would), or None.
    """
    batch, n, _ = x.shape
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if qv is not None:
        q, v = q + qv[0].to(q.dtype), v + qv[1].to(v.dtype)
    q, k, v = (t.view(batch, n, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    scale = getattr(attn, "scaling", None) or attn.scale
    dropout = getattr(attn, "attention_dropout", None)
    dropout = getattr(attn, "dropout", 0.0) if dropout is None else dropout
    out, metric = attend(q, k, v, size, need, dropout_p=dropout if attn.training else 0.0, scale=scale)
    out = out.transpose(1, 2).reshape(batch, n, -1).contiguous()
    return (attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj)(out), metric


def hf_layer(layer: nn.Module, x: torch.Tensor, r: int, size: torch.Tensor | None,
             source: torch.Tensor | None, num_prefix: int, config: CompressionConfig,
             index: int = 0, qv_delta: QVDelta | None = None):
    """One HF ViT layer (number ``index``) removing ``r`` tokens after attention, with the
    forward's q/v delta (or None). Returns ``(x, size, source)``."""
    norm1, attn, drop1, ls1, norm2, drop2, ls2 = _parts(layer)
    h = norm1(x)
    qv = None if qv_delta is None else qv_delta(index, h)
    out, metric = hf_attention(attn, h, size if config.prop_attn else None, need_for(config, r), qv)
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

    def run_layers(self, x: torch.Tensor, r: Schedule | None = None, qv_delta: QVDelta | None = None,
                   attention_mask=None) -> tuple[torch.Tensor, TokenState]:
        """Tokens (B, N, C) through every layer at degree ``r`` (default ``self.r``) with the q/v
        delta ``qv_delta`` (or None) -> (B, N_L, C) and their :class:`TokenState`."""
        refuse_masks(attention_mask)
        with state_lock(self).shared():  # degree and weights stay put until this forward ends
            config: CompressionConfig = self._tocom
            batch, n, _ = x.shape
            npt = self._tocom_prefix
            state = TokenState(None, None, npt, self.effective_schedule(n, r), qv_delta=qv_delta)
            if config.trace_source:
                state.source = initial_source(batch, n, x.device, x.dtype)
            for index, (layer, r_here) in enumerate(zip(_layers(self), state.schedule)):
                x, state.size, state.source = hf_layer(layer, x, r_here, state.size, state.source, npt,
                                                       config, index, qv_delta)
                state.tokens.append(x.shape[1])
        self.last_state = state  # for inspection only (the latest forward of any thread)
        return x, state


class CompressedEncoderMixin(CompressedOwnerMixin):
    """``Dinov2Encoder`` / ``CLIPEncoder`` / ``SiglipEncoder`` forward, at ``model.r`` (for callers of
    the inner backbone; the patched model itself calls :meth:`run_layers`)."""

    def forward(self, hidden_states=None, attention_mask=None, inputs_embeds=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        x = hidden_states if hidden_states is not None else inputs_embeds
        return BaseModelOutput(last_hidden_state=self.run_layers(x, attention_mask=attention_mask)[0])


def _embed(backbone: nn.Module, pixel_values: torch.Tensor, bool_masked_pos=None,
           interpolate_pos_encoding=None) -> torch.Tensor:
    """Images (B, 3, H, W) -> the tokens (B, N, C) that enter the first layer, as the backbone makes them."""
    if hasattr(backbone, "pre_layrnorm"):  # CLIP (sic)
        return backbone.pre_layrnorm(backbone.embeddings(pixel_values,
                                                         interpolate_pos_encoding=interpolate_pos_encoding))
    if hasattr(backbone, "post_layernorm"):  # SigLIP
        return backbone.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    if hasattr(backbone, "encoder"):  # DINOv2 always interpolates its position embeddings
        return backbone.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
    pixel_values = pixel_values.to(backbone.embeddings.patch_embeddings.projection.weight.dtype)
    return backbone.embeddings(pixel_values, bool_masked_pos=bool_masked_pos,
                               interpolate_pos_encoding=interpolate_pos_encoding)


def _finish(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last layer's tokens (B, N, C) -> the backbone's ``last_hidden_state``."""
    if hasattr(backbone, "pre_layrnorm"):  # CLIP normalises only the pooled class token
        return x
    if hasattr(backbone, "post_layernorm"):  # SigLIP
        return backbone.post_layernorm(x)
    return backbone.layernorm(x)


class CompressedViTModelMixin(CompressedOwnerMixin):
    """``ViTModel`` / ``DeiTModel`` as the inner backbone of a classifier, at ``model.r``."""

    def forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
                attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        x = _embed(self, pixel_values, bool_masked_pos, interpolate_pos_encoding)
        x = self.layernorm(self.run_layers(x, attention_mask=attention_mask)[0])
        pooled = self.pooler(x) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


def _name(model: nn.Module) -> str:
    return getattr(type(model), "_tocom_base", type(model)).__name__


def _num_classes(model: nn.Module, name: str) -> int:
    return getattr(model.config, "num_labels", 0) if "Classification" in name else 0


def _pool(model: nn.Module, name: str, x: torch.Tensor, size: torch.Tensor | None, npt: int
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``last_hidden_state`` (B, N, C) and sizes (B, N, 1) or None -> (the features the head reads,
    the head's output: logits, or the model's ``pooler_output`` / ``image_embeds``; None where HF has
    none)."""
    backbone = _get(model, _MODELS[name])
    if name in ("ViTModel", "DeiTModel"):
        return x[:, 0], model.pooler(x) if model.pooler is not None else None
    if name in ("ViTForImageClassification", "DeiTForImageClassification"):
        return x[:, 0], model.classifier(x[:, 0])
    if name == "DeiTForImageClassificationWithTeacher":  # timm's distilled DeiT pools the same way
        logits = (model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2
        return (x[:, 0] + x[:, 1]) / 2, logits
    if name.startswith("Dinov2") and name.endswith("Model"):
        return x[:, 0], x[:, 0]
    patches = weighted_mean(x[:, npt:], None if size is None else size[:, npt:])
    if name.startswith("Dinov2"):  # classifier: class token and the mean of the patch tokens
        features = torch.cat([x[:, 0], patches], dim=1)
        return features, model.classifier(features)
    if name in ("CLIPVisionModel", "CLIPVisionModelWithProjection"):
        pooled = backbone.post_layernorm(x[:, 0])
        return pooled, pooled if name == "CLIPVisionModel" else model.visual_projection(pooled)
    if name == "SiglipVisionModel":
        if not backbone.use_head:
            return patches, None
        pooled = backbone.head(x)
        return pooled, pooled
    return patches, model.classifier(patches)  # CLIP / SigLIP classifiers: the mean of the patch tokens


def _averages(model: nn.Module, name: str) -> bool:
    """Whether the model's head averages tokens (so reduced tokens need their sizes)."""
    if name == "SiglipVisionModel":
        return not model.use_head
    dinov2_classifier = name.startswith("Dinov2") and "Classification" in name
    return dinov2_classifier or name.startswith(("CLIPFor", "SiglipFor"))


class HFModelMixin:
    """The model the user passed: Hugging Face's call with a per-call degree and q/v delta, and
    timm's split of it into :meth:`forward_tokens` and :meth:`forward_head`."""

    def _tocom_owner(self) -> nn.Module:
        return _get(self, self._tocom_owner_path)

    @property
    def num_classes(self) -> int:
        """Classes of the classifier head, 0 for a backbone (timm's convention)."""
        return _num_classes(self, _name(self))

    def forward_tokens(self, pixel_values: torch.Tensor, r: Schedule | None = None,
                       qv_delta: QVDelta | None = None, *, bool_masked_pos=None,
                       interpolate_pos_encoding=None, attention_mask=None) -> tuple[torch.Tensor, TokenState]:
        """Images (B, 3, H, W) -> ``last_hidden_state`` (B, N_L, C) and their :class:`TokenState`.

        Args:
            r: a degree for this call only (default: ``model.r``); no shared state changes. With a
                plugin attached the call also gets the plugin's delta for that degree, on the fly.
            qv_delta: live q/v additions for this call (a plugin in training).
        """
        refuse_masks(attention_mask)
        backbone = _get(self, _MODELS[_name(self)])
        with state_lock(self).shared():  # degree and weights stay put until this forward ends
            delta = with_plugin(self, r, qv_delta)
            x = _embed(backbone, pixel_values, bool_masked_pos, interpolate_pos_encoding)
            x, state = self._tocom_owner().run_layers(x, r, delta)
            return _finish(backbone, x), state

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """``last_hidden_state`` (B, N, C) -> logits (B, classes) of a classifier, else the pooled
        output (B, C') (``pooler_output``, CLIP's ``image_embeds``); ``pre_logits``: the features
        (B, C'') the head reads. ``size`` (B, N, 1): the tokens' sizes from :meth:`forward_tokens`,
        needed where the head averages reduced tokens."""
        name, owner = _name(self), self._tocom_owner()
        if _averages(self, name):
            require_sizes(x, size, owner._tocom_tokens)
        features, out = _pool(self, name, x, size, owner._tocom_prefix)
        return features if pre_logits or out is None else out

    def forward(self, pixel_values=None, *args, r: Schedule | None = None, **kwargs):
        """Hugging Face's forward (same arguments, same output type), at degree ``r`` for this call
        alone (default: ``model.r``)."""
        name = _name(self)
        if args:  # positional arguments after pixel_values mean what the HF class says they mean
            params = [p for p in inspect.signature(type(self)._tocom_base.forward).parameters
                      if p not in ("self", "pixel_values", "kwargs")]
            kwargs.update(zip(params, args))
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True: a patched model does not record them; "
                                 "call tocom.unpatch(model) to get them")
        embed = {k: kwargs.get(k) for k in ("bool_masked_pos", "interpolate_pos_encoding", "attention_mask")}
        with state_lock(self).shared():  # from embeddings to head
            x, state = self.forward_tokens(pixel_values, r, **embed)
            _, out = _pool(self, name, x, state.size, state.num_prefix)
            result = _output(self, name, x, out, kwargs.get("labels"))
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()


def _output(model: nn.Module, name: str, x: torch.Tensor, out: torch.Tensor | None, labels):
    """The HF output type of ``name`` for ``last_hidden_state`` x and head output ``out``."""
    if name == "DeiTForImageClassificationWithTeacher":
        from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput

        return DeiTForImageClassificationWithTeacherOutput(
            logits=out, cls_logits=model.cls_classifier(x[:, 0]),
            distillation_logits=model.distillation_classifier(x[:, 1]))
    if "Classification" in name:
        from transformers.modeling_outputs import ImageClassifierOutput

        loss = None if labels is None else model.loss_function(labels, out, model.config)
        return ImageClassifierOutput(loss=loss, logits=out)
    if name == "CLIPVisionModelWithProjection":
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        return CLIPVisionModelOutput(image_embeds=out, last_hidden_state=x)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=out)


class CompressedTopMixin(HFModelMixin):
    """The model the user passed when it is not the owner: ``model.r`` reaches the owner."""

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


class CompressedViTTopMixin(HFModelMixin, CompressedViTModelMixin):
    """``ViTModel`` / ``DeiTModel`` passed by the user: owner and model at once."""


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
    features = frozenset({"per_call"})

    def claims(self, model: nn.Module) -> bool:
        cls = getattr(type(model), "_tocom_base", type(model))
        return cls.__module__.startswith("transformers.") and cls.__name__ in _MODELS

    def _owner(self, model: nn.Module) -> nn.Module:
        return _get(model, _owner_path(_name(model), model))

    def check(self, model: nn.Module) -> None:
        for i, layer in enumerate(_layers(self._owner(model))):
            if getattr(_parts(layer)[1], "num_key_value_groups", 1) != 1:
                raise TypeError(f"{type(model).__name__} layer {i} uses grouped-query attention; "
                                "tocom does not support it")

    def patch(self, model: nn.Module, config: CompressionConfig) -> None:
        owner_path = _owner_path(_name(model), model)
        owner = _get(model, owner_path)
        dims = self.dims(model)
        if owner is model:
            swap_class(model, CompressedViTTopMixin)
        else:
            inner = CompressedViTModelMixin if hasattr(owner, "embeddings") else CompressedEncoderMixin
            swap_class(owner, inner)
            swap_class(model, CompressedTopMixin)
        init_state(owner, config)
        owner._tocom_prefix, owner._tocom_tokens = dims.num_prefix, dims.num_tokens
        model._tocom_lock, model._tocom = owner._tocom_lock, config
        model._tocom_owner_path = owner_path

    def reconfigure(self, model: nn.Module, config: CompressionConfig) -> None:
        model._tocom = config
        self._owner(model)._tocom = config

    def unpatch(self, model: nn.Module) -> None:
        owner = self._owner(model)
        restore_class(owner)
        drop_state(owner, ("_tocom_prefix", "_tocom_tokens"))
        restore_class(model)
        model.__dict__.pop("_tocom_owner_path", None)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_layers(self._owner(model)))

    def has_class_token(self, model: nn.Module) -> bool:
        return _num_prefix(model, _name(model)) > 0

    def dims(self, model: nn.Module) -> ViTDims:
        name = _name(model)
        layers = _layers(self._owner(model))
        attn = _parts(layers[0])[1]
        embeddings = _get(model, _MODELS[name]).embeddings
        conv = embeddings.patch_embeddings.projection if hasattr(embeddings, "patch_embeddings") \
            else embeddings.patch_embedding
        mlp = layers[0].mlp
        hidden = mlp.fc2.in_features if hasattr(mlp, "fc2") else mlp.down_proj.in_features * 3 // 2
        config = getattr(model.config, "vision_config", model.config)
        grid = config.image_size // config.patch_size
        return ViTDims(depth=len(layers), embed_dim=conv.out_channels, mlp_hidden=hidden,
                       num_patches=grid * grid, num_prefix=_num_prefix(model, name),
                       patch_size=config.patch_size, in_chans=conv.in_channels,
                       num_classes=_num_classes(model, name), attn_dim=_heads(attn) * attn.head_dim)

    def num_heads(self, model: nn.Module) -> int:
        return _heads(_parts(_layers(self._owner(model))[0])[1])

    def qv_projections(self, model: nn.Module) -> list[QVProjections]:
        return [QVProjections(Projection(_parts(layer)[1], "q_proj", slice(None)),
                              Projection(_parts(layer)[1], "v_proj", slice(None)))
                for layer in _layers(self._owner(model))]

"""A Segmenter-style model (Strudel et al., 2021, linear decoder): a timm ViT backbone whose patch
tokens are classified one by one and the ``(H/p, W/p)`` logit map upsampled to the image.

The backbone may be patched by :func:`tocom.patch`: in ``mode="dense"`` it returns full-length
token sequences; in the standard mode it must trace sources (``trace_source=True``) so that merged
tokens can be unmerged to every patch they stand for.

Checkpoint files are safetensors with the backbone under ``backbone.*``, the decoder under
``decoder.*`` and metadata ``task = segmentation`` plus what :func:`save_segmenter` records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from tocom.compress import unmerge
from tocom.models.loading import read_state_dict, save_model
from tocom.models.metadata import json_field
from tocom.models.metadata import model_kwargs as checked_model_kwargs


class Segmenter(nn.Module):
    """``Segmenter(backbone, num_classes)(images (B, 3, H, W)) -> logits (B, K, H, W)``."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if getattr(backbone, "num_classes", 0) != 0:
            raise ValueError("the backbone keeps its classification head; build it with num_classes=0")
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.decoder.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> one token per patch (B, H/p * W/p, C), unmerged if needed."""
        bb = self.backbone
        tokens = bb.forward_features(images)
        full = bb.patch_embed.num_patches + bb.num_prefix_tokens
        if tokens.shape[1] != full:
            source = getattr(getattr(bb, "last_state", None), "source", None)
            if source is None:
                raise ValueError(f"the backbone returned {tokens.shape[1]} of {full} tokens; patch it with "
                                 "mode='dense' (or trace_source=True) for segmentation")
            tokens = unmerge(tokens, source)
        return tokens[:, bb.num_prefix_tokens:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.backbone.patch_embed.grid_size
        logits = self.decoder(self.patch_tokens(images))  # (B, h*w, K)
        logits = logits.transpose(1, 2).reshape(images.shape[0], self.num_classes, *grid)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def save_segmenter(model: Segmenter, path: str | Path, model_name: str, model_kwargs: dict | None = None,
                   metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as safetensors; ``metadata`` values are stored as JSON."""
    meta = {"task": "segmentation", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    return save_model(model, path, model_name, model_kwargs, meta)


def load_segmenter(path: str | Path) -> tuple[Segmenter, dict[str, Any]]:
    """Rebuild a :func:`save_segmenter` file: the (unpatched) model and its metadata (JSON decoded)."""
    state, meta = read_state_dict(path)
    if meta.get("task") != "segmentation" or "model_name" not in meta:
        raise ValueError(f"{path} is not a tocom segmentation checkpoint (its metadata has no "
                         "task=segmentation); train one with `tocom finetune --task segmentation`")
    kwargs = checked_model_kwargs(meta, path)
    classes = json_field(meta, "num_classes", None, int, path)
    if classes is None or not 1 <= classes <= 1 << 16:
        raise ValueError(f"{path}: metadata num_classes is {meta.get('num_classes')!r}, not a class count; "
                         "re-train the segmenter")

    def build() -> Segmenter:
        return Segmenter(timm.create_model(meta["model_name"], pretrained=False, num_classes=0, **kwargs),
                         classes)

    with torch.device("meta"):  # checked without memory before the real build
        own = build().state_dict()
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        raise ValueError(f"{path} does not fit {meta['model_name']} with a "
                         f"{meta['num_classes']}-class decoder")
    model = build()
    model.load_state_dict(state)
    decoded = {k: (v if k in ("task", "model_name") else json.loads(v)) for k, v in meta.items()}
    return model.eval(), decoded

"""Image transforms: PIL RGB image -> normalised ``(3, img_size, img_size)`` float tensor.

``eval_transform`` follows the model's own pretrained config (timm); ``train_transform`` picks
an augmentation recipe by name. For VTAB-1k, PYRA and ToCom use ``"squash"`` for both training
and evaluation.

A fine-tuned checkpoint records the evaluation preprocessing it was validated with as a small
JSON-able dict (:func:`preprocessing_record`); :func:`transform_from_record` rebuilds exactly that
transform, so evaluation and serving see the images the model was validated on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from torchvision import transforms as T

ModelOrCfg = torch.nn.Module | Mapping[str, Any] | str
TRAIN_KINDS: tuple[str, ...] = ("deit", "light", "none", "squash")
RESIZES: tuple[str, ...] = ("crop", "squash")


def data_config(model_or_cfg: ModelOrCfg, img_size: int | None = None) -> dict[str, Any]:
    """timm data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``).

    Args:
        model_or_cfg: a timm model (its ``pretrained_cfg`` is used), a pretrained-cfg or data-config
            dict, or a timm model name (its default pretrained cfg; nothing is downloaded).
        img_size: overrides the square input size.
    """
    if img_size is None and isinstance(model_or_cfg, torch.nn.Module):
        # A model built with another img_size than its pretrained cfg must get images of its size.
        built = getattr(getattr(model_or_cfg, "patch_embed", None), "img_size", None)
        img_size = built[0] if isinstance(built, (tuple, list)) else built
    args = {"img_size": int(img_size)} if img_size is not None else None
    if isinstance(model_or_cfg, torch.nn.Module):
        return resolve_data_config(args=args, model=model_or_cfg)
    if isinstance(model_or_cfg, str):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_or_cfg)
        if cfg is None:
            raise ValueError(
                f"timm has no pretrained config for {model_or_cfg!r}; pass a model or a config dict"
            )
        return resolve_data_config(args=args, pretrained_cfg=cfg.to_dict())
    if isinstance(model_or_cfg, Mapping):
        return resolve_data_config(args=args, pretrained_cfg=dict(model_or_cfg))
    raise TypeError(
        f"expected a timm model, a config dict or a model name, got {type(model_or_cfg).__name__}"
    )


def eval_transform(model_or_cfg: ModelOrCfg, img_size: int | None = None) -> Callable[[Any], torch.Tensor]:
    """The model's evaluation transform: resize to ``img_size / crop_pct``, centre crop, normalise.

    Interpolation, ``crop_pct`` and mean/std come from the model's pretrained config (DeiT:
    bicubic, 0.875/0.9). Output: ``(3, S, S)`` float tensor, ``S = img_size`` or the model's size.
    """
    return create_transform(**data_config(model_or_cfg, img_size), is_training=False)


def train_transform(
    kind: str = "deit",
    img_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    model_or_cfg: ModelOrCfg | None = None,
) -> Callable[[Any], torch.Tensor]:
    """A training transform; output ``(3, img_size, img_size)`` float tensor.

    Args:
        kind: ``"deit"``: timm's DeiT recipe (random resized crop, flip, RandAugment
            ``rand-m9-mstd0.5-inc1``, random erasing p=0.25, bicubic). ``"light"``: random
            resized crop + horizontal flip. ``"none"`` / ``"squash"``: resize both sides to
            ``img_size`` (aspect ratio not kept, nothing cropped), no augmentation: the VTAB-1k
            recipe of NOAH/PYRA/ToCom. Crops and flips change the label of location,
            orientation and counting tasks, so use ``"squash"`` for those.
        img_size: output side; defaults to the model's input size, else 224.
        mean, std: normalisation; default to the model's config, else ImageNet's.
        model_or_cfg: optional timm model / config / name supplying the defaults.
    """
    if kind not in TRAIN_KINDS:
        raise ValueError(f"unknown train transform kind {kind!r}; choose one of {TRAIN_KINDS}")
    cfg = data_config(model_or_cfg, img_size) if model_or_cfg is not None else {}
    size = int(img_size or cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(mean or cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(std or cfg.get("std", IMAGENET_DEFAULT_STD))
    if kind == "deit":
        return _posterize_any_bits(create_transform(
            input_size=size,
            is_training=True,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic",
            re_prob=0.25,
            re_mode="pixel",
            re_count=1,
            mean=mean,
            std=std,
        ))
    bicubic = T.InterpolationMode.BICUBIC
    if kind == "light":
        first: list[Any] = [T.RandomResizedCrop(size, interpolation=bicubic), T.RandomHorizontalFlip()]
    else:
        first = [T.Resize((size, size), interpolation=bicubic)]
    return T.Compose([*first, T.ToTensor(), T.Normalize(mean, std)])


def preprocessing_record(resize: str, model_or_cfg: ModelOrCfg, img_size: int | None = None
                         ) -> dict[str, Any]:
    """The evaluation preprocessing as data: ``resize, size, interpolation, crop_pct, mean, std``.

    ``resize="crop"`` is timm's evaluation transform (resize to ``size / crop_pct``, centre crop);
    ``"squash"`` resizes both sides to ``size`` (the VTAB-1k recipe). Mean, std, size and
    interpolation come from the model's config, as in :func:`eval_transform`.
    """
    if resize not in RESIZES:
        raise ValueError(f"unknown resize {resize!r}; choose one of {RESIZES}")
    cfg = data_config(model_or_cfg, img_size)
    return {"resize": resize, "size": int(cfg["input_size"][-1]),
            "interpolation": "bicubic" if resize == "squash" else str(cfg["interpolation"]),
            "crop_pct": float(cfg["crop_pct"]) if resize == "crop" else 1.0,
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}


def transform_from_record(record: Mapping[str, Any]) -> Callable[[Any], torch.Tensor]:
    """The transform a :func:`preprocessing_record` describes: PIL RGB -> ``(3, size, size)`` tensor."""
    missing = {"resize", "size", "interpolation", "crop_pct", "mean", "std"} - set(record)
    if missing or record["resize"] not in RESIZES:
        raise ValueError(f"not a preprocessing record (missing {sorted(missing)}, or resize not in "
                         f"{RESIZES}): {dict(record)}")
    mean, std = tuple(record["mean"]), tuple(record["std"])
    if record["resize"] == "crop":
        return create_transform(input_size=int(record["size"]), is_training=False,
                                interpolation=record["interpolation"], crop_pct=float(record["crop_pct"]),
                                mean=mean, std=std)
    mode = T.InterpolationMode(record["interpolation"])
    return T.Compose([T.Resize((int(record["size"]),) * 2, interpolation=mode), T.ToTensor(),
                      T.Normalize(mean, std)])


def _posterize_zero_safe(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Posterize as RandAugment means it, including keeping 0 bits (a black image)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # what Pillow gave for 0 bits before it refused them
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_any_bits(transform: T.Compose) -> T.Compose:
    """``transform`` with its RandAugment's posterize ops able to keep 0 bits.

    timm's ``inc1`` posterize keeps ``4 - int(0.4 m)`` bits, so 0 at magnitude 10, which
    ``mstd0.5`` draws about once in 40 ops; recent Pillow raises on 0 bits, and a distillation or
    fine-tune died on it a few hundred images in.
    """
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize_zero_safe
    return transform

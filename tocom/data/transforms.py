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
    """The transform a :func:`preprocessing_record` describes: PIL RGB -> ``(3, size, size)`` tensor.

    A record may also name ``resize_size`` (an int): the side the image is first resized to, both
    sides (``squash``) or the shorter one (``crop``), before a centre crop to ``size`` whose offset
    is rounded down (Hugging Face image processors' convention; see :func:`hf_record`).
    """
    missing = {"resize", "size", "interpolation", "crop_pct", "mean", "std"} - set(record)
    if missing or record["resize"] not in RESIZES:
        raise ValueError(f"not a preprocessing record (missing {sorted(missing)}, or resize not in "
                         f"{RESIZES}): {dict(record)}")
    mean, std = tuple(record["mean"]), tuple(record["std"])
    if record.get("resize_size") is not None:
        resize = ResizeCrop(record["resize"], int(record["resize_size"]), int(record["size"]),
                            record["interpolation"])
        return T.Compose([resize, T.ToTensor(), T.Normalize(mean, std)])
    if record["resize"] == "crop":
        return create_transform(input_size=int(record["size"]), is_training=False,
                                interpolation=record["interpolation"], crop_pct=float(record["crop_pct"]),
                                mean=mean, std=std)
    mode = T.InterpolationMode(record["interpolation"])
    return T.Compose([T.Resize((int(record["size"]),) * 2, interpolation=mode), T.ToTensor(),
                      T.Normalize(mean, std)])


_PIL_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                 "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
# Pillow's resample codes, as Hugging Face image processors record them (``"resample": 3``).
HF_RESAMPLE = {int(code): name for name, code in _PIL_RESAMPLE.items()}


class ResizeCrop:
    """Resize (both sides to ``resize_size``, or the shorter side keeping the aspect ratio), then a
    centre crop to ``size`` with offsets rounded down: PIL image -> PIL image of ``size x size``."""

    def __init__(self, resize: str, resize_size: int, size: int, interpolation: str) -> None:
        if interpolation not in _PIL_RESAMPLE:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of "
                             f"{sorted(_PIL_RESAMPLE)}")
        if resize_size < size:
            raise ValueError(f"resize_size {resize_size} is below the crop size {size}; a crop cannot grow")
        self.resize, self.resize_size, self.size = resize, resize_size, size
        self.resample = _PIL_RESAMPLE[interpolation]

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.resize == "squash":
            width = height = self.resize_size
        elif width <= height:  # the shorter side becomes resize_size; the longer keeps the ratio
            width, height = self.resize_size, int(self.resize_size * height / width)
        else:
            width, height = int(self.resize_size * width / height), self.resize_size
        if (width, height) != image.size:
            image = image.resize((width, height), resample=self.resample, reducing_gap=None)
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"ResizeCrop({self.resize}, resize_size={self.resize_size}, size={self.size})"


def hf_record(processor: Mapping[str, Any], source: str = "the image processor") -> dict[str, Any]:
    """A preprocessing record from a Hugging Face ``preprocessor_config.json`` (ViT, DeiT, BiT, CLIP,
    SigLIP, DINOv2 image processors): the same pixels without importing ``transformers``.

    ``size`` ``{"height", "width"}`` squashes to that side, ``{"shortest_edge"}`` resizes the shorter
    side; ``do_center_crop`` then crops to ``crop_size``. Pixels are rescaled by 1/255 and
    normalised by ``image_mean`` / ``image_std`` (0 and 1 when ``do_normalize`` is false).
    Anything the record cannot express exactly (non-square sizes, another rescale factor) is refused.
    """
    def side(value: Any, what: str) -> tuple[str, int]:
        if isinstance(value, int):
            return "squash", value
        if isinstance(value, Mapping) and set(value) == {"height", "width"}:
            if value["height"] != value["width"]:
                raise ValueError(f"{source}: {what} {dict(value)} is not square; tocom feeds square images")
            return "squash", int(value["height"])
        if isinstance(value, Mapping) and set(value) == {"shortest_edge"}:
            return "crop", int(value["shortest_edge"])
        raise ValueError(f"{source}: {what} {value!r} is neither {{height, width}} nor {{shortest_edge}}; "
                         "give the preprocessing with tocom's --resize or re-save the processor")

    resize, resize_size = side(processor.get("size", {"height": 224, "width": 224}), "size")
    if processor.get("do_resize", True) is False:
        raise ValueError(f"{source}: do_resize is false, so image sizes would vary; set it true")
    size = resize_size
    if processor.get("do_center_crop", False):
        size = side(processor.get("crop_size", resize_size), "crop_size")[1]
    elif resize == "crop":
        raise ValueError(f"{source}: a shortest_edge resize without do_center_crop gives non-square images; "
                         "set do_center_crop with a crop_size")
    factor = processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1.0
    if abs(float(factor) * 255 - 1) > 1e-6:
        raise ValueError(f"{source}: rescale_factor {factor} is not 1/255 (do_rescale true); tocom reads "
                         "pixels as 0..1")
    resample = processor.get("resample", 2)
    if resample not in HF_RESAMPLE:
        raise ValueError(f"{source}: resample {resample!r} is not a Pillow code {sorted(HF_RESAMPLE)}")
    normalize = processor.get("do_normalize", True)
    mean = processor.get("image_mean", [0.5] * 3) if normalize else [0.0] * 3
    std = processor.get("image_std", [0.5] * 3) if normalize else [1.0] * 3
    mean, std = ([float(x)] * 3 if isinstance(x, (int, float)) else [float(v) for v in x]
                 for x in (mean, std))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{source}: image_mean and image_std need 3 values (RGB), got {mean}, {std}")
    return {"resize": resize, "size": size, "resize_size": resize_size,
            "interpolation": HF_RESAMPLE[resample], "crop_pct": size / resize_size, "mean": mean, "std": std}


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

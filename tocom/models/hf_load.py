"""Hugging Face models named ``hf:PATH``: a ``save_pretrained`` folder, or a hub id when online.

``PATH`` is looked up as a local folder first. Anything else is taken as a hub id and fetched
with ``huggingface_hub`` from its cache only (``local_files_only``) when ``HF_HUB_OFFLINE`` is
set, else from the hub. Before anything is built the folder's metadata is checked:
``config.json`` parses and names an architecture the ``hf-vit`` adapter supports, and the
weights are safetensors (``pytorch_model.bin`` would unpickle, so it is refused).

The model comes back as the ``transformers`` model itself (so :func:`tocom.patch` recognises
it), built with SDPA attention in float32, with one forward hook that returns the output's
``logits`` tensor instead of the ``ImageClassifierOutput``: evaluation, benchmarks, serving and
training then treat it like a timm classifier. ``model.num_classes`` is its label count.

Its preprocessing comes from the folder's ``preprocessor_config.json``
(:func:`tocom.data.transforms.hf_record`) unless a tocom checkpoint records its own.
``transformers`` is imported only here, and only when an ``hf:`` model is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tocom.data.transforms import RESIZES, hf_record
from tocom.models.hf_vit import _MODELS as SUPPORTED_ARCHITECTURES
from tocom.models.loading import read_state_dict
from tocom.models.metadata import json_field

HF_PREFIX = "hf:"
INSTALL_HINT = 'pip install "tocom[hf]"'
# Output layers of the supported classifiers (DeiT's distilled variant has two).
HEAD_NAMES = ("classifier", "cls_classifier", "distillation_classifier")


def is_hf(name: str | None) -> bool:
    """Whether a model name is an ``hf:PATH`` reference."""
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def require_transformers():
    """The ``transformers`` module, or ValueError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"hf: models need the transformers library, which is not installed; "
                         f"{INSTALL_HINT}") from None
    return transformers


def resolve_folder(name: str, online: bool | None = None) -> Path:
    """The local folder of ``hf:PATH``: PATH itself, else the hub snapshot of the id PATH.

    Args:
        online: may the hub be asked; None means yes unless ``HF_HUB_OFFLINE`` is set.
    """
    if not is_hf(name):
        raise ValueError(f"{name!r} is not an hf: model; write hf:FOLDER or hf:OWNER/NAME")
    path = name[len(HF_PREFIX):]
    if not path:
        raise ValueError("hf: names a folder or hub id after the colon, e.g. "
                         "hf:facebook/deit-tiny-patch16-224")
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ValueError(f"{name}: {path} is a file; pass the save_pretrained folder that holds config.json")
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{name}: no folder {path} (and it is not a hub id OWNER/NAME)")
    if online is None:
        online = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("", "0", "false", "no", "off")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=not online,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception:  # noqa: BLE001 - every hub failure (offline, no cache, no network) reads the same
        raise ValueError(f"{name} is not a local folder and the hub is unreachable; download it with "
                         f"`hf download {path} --local-dir DIR` and pass hf:DIR, or pass a folder") from None


def check_folder(folder: Path, name: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a folder whose architecture and weight format tocom can load."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{name}: {folder} has no config.json; pass a folder written by save_pretrained")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{name}: {config_file} is not valid JSON ({err}); re-save the model") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ValueError(f"{name}: {config_file} names no architectures; re-save the model with "
                         "save_pretrained")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{name}: architecture {archs[0]} is not supported; tocom supports "
                         f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").is_file():
        if any(folder.glob("pytorch_model*.bin")):
            raise ValueError(f"{name}: {folder} holds pytorch_model.bin, which loads by unpickling; re-save "
                             "it as safetensors: model.save_pretrained(DIR, safe_serialization=True) "
                             "(transformers 5 always writes safetensors)")
        raise ValueError(f"{name}: {folder} holds no model.safetensors; re-save the model with "
                         "save_pretrained")
    return config


def architecture(name: str) -> str:
    """The class name an ``hf:`` folder's config names (checked as :func:`load_hf` checks it)."""
    return check_folder(resolve_folder(name), name)["architectures"][0]


def _logits_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return getattr(output, "logits", output)


def logits_only(model: nn.Module) -> nn.Module:
    """Make ``model(pixel_values)`` return the ``(B, num_labels)`` logits tensor (idempotent)."""
    if _logits_hook not in model._forward_hooks.values():
        model.register_forward_hook(_logits_hook)
    model.num_classes = int(getattr(model.config, "num_labels", 0))
    return model


def load_hf(name: str, checkpoint: str | Path | None = None, *, num_labels: int | None = None,
            id2label: dict[int, str] | None = None,
            prepare: Callable[[nn.Module, dict[str, str]], object] | None = None) -> nn.Module:
    """Build ``hf:PATH`` (see the module docstring), in eval mode, returning logits.

    Args:
        checkpoint: tocom safetensors of this architecture (``tocom finetune hf:...`` output); its
            head size wins over the folder's and it is loaded strictly.
        num_labels: a head of this size (a fresh one when it differs from the folder's).
        id2label: class names of that head.
        prepare: called with the fresh model and the checkpoint's metadata before the strict load,
            to add the modules the checkpoint holds (AdaptFormer adapters).
    """
    transformers = require_transformers()
    folder = resolve_folder(name)
    arch = check_folder(folder, name)["architectures"][0]
    cls = getattr(transformers, arch)
    extra: dict[str, Any] = {}
    if id2label is not None:
        extra = {"id2label": dict(enumerate(id2label)) if isinstance(id2label, list) else id2label}
        extra["label2id"] = {v: k for k, v in extra["id2label"].items()}
    if checkpoint is None:
        if num_labels is not None:
            extra["num_labels"] = num_labels
        try:
            with quiet(transformers):
                model = cls.from_pretrained(folder, attn_implementation="sdpa", use_safetensors=True,
                                            local_files_only=True, dtype=torch.float32,
                                            ignore_mismatched_sizes=num_labels is not None, **extra)
        except (OSError, RuntimeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{name}: transformers could not load {folder} ({first})") from None
        return logits_only(model).eval()
    state, meta = read_state_dict(checkpoint)
    if meta.get("hf_architecture", arch) != arch:
        raise ValueError(f"checkpoint {checkpoint} was saved for {meta['hf_architecture']}, but {name} is "
                         f"{arch}; pass the folder it was fine-tuned from")
    heads = [state[f"{h}.weight"].shape[0] for h in HEAD_NAMES if f"{h}.weight" in state]
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if heads:
        config.num_labels = int(heads[0])
    if "classes" in meta and id2label is None:
        names = json.loads(meta["classes"])
        if isinstance(names, list) and len(names) == config.num_labels:
            config.id2label = dict(enumerate(names))
            config.label2id = {v: k for k, v in config.id2label.items()}
    for key, value in extra.items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    model = cls(config)
    if prepare is not None:
        prepare(model, meta)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {checkpoint} does not fit {name} ({arch}): missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}; pass the folder it "
                         "was fine-tuned from")
    model.load_state_dict(state)
    return logits_only(model.float()).eval()


@contextmanager
def quiet(transformers):
    """transformers without its progress bars and info logs (a CLI prints one line per result)."""
    hf_logging = transformers.utils.logging
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def class_names(model: nn.Module) -> list[str] | None:
    """Class names from ``config.id2label`` in label order (None when it does not cover every class)."""
    labels = getattr(getattr(model, "config", None), "id2label", None) or {}
    num = int(getattr(model.config, "num_labels", 0))
    try:
        names = [str(labels[i] if i in labels else labels[str(i)]) for i in range(num)]
    except KeyError:
        return None
    return names or None


def folder_preprocessing(name: str) -> dict[str, Any]:
    """The preprocessing record of an ``hf:`` folder's ``preprocessor_config.json``."""
    folder = resolve_folder(name)
    check_folder(folder, name)
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        raise ValueError(f"{name}: {folder} has no preprocessor_config.json, so tocom cannot tell how "
                         "its images were preprocessed; save the image processor there "
                         "(processor.save_pretrained)")
    try:
        processor = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{name}: {file} is not valid JSON ({err})") from None
    return hf_record(processor, str(file))


def hf_preprocessing(name: str, meta: dict[str, str] | None = None, resize: str | None = None
                     ) -> dict[str, Any]:
    """The evaluation preprocessing of ``hf:PATH``: what a tocom checkpoint's metadata records, else
    the folder's image processor. ``resize`` (``crop`` / ``squash``) overrides how images are
    resized, keeping size, interpolation and normalisation."""
    meta = meta or {}
    record = (json_field(meta, "preprocessing", {}, dict, "the checkpoint") if "preprocessing" in meta
              else folder_preprocessing(name))
    if resize is not None and resize != record["resize"]:
        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; choose one of {RESIZES}")
        record = {**record, "resize": resize, "resize_size": None,
                  "crop_pct": record["crop_pct"] if resize == "crop" else 1.0}
    return record


def save_hf(model: nn.Module, folder: str | Path, preprocessing: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` an unpatched HF model to ``folder`` (safetensors), with an image processor
    config for ``preprocessing`` (a record) so that ``transformers`` preprocesses as tocom did."""
    folder = Path(folder)
    if hasattr(model, "_tocom") or type(model).__dict__.get("_tocom_base") is not None:
        raise ValueError("unpatch the model (tocom.unpatch) before saving it for transformers")
    with quiet(require_transformers()):
        model.save_pretrained(folder)  # safetensors: transformers 5 writes no other format
    if preprocessing is not None:
        config = processor_config(preprocessing)
        (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return folder


def processor_config(record: dict[str, Any]) -> dict[str, Any]:
    """A ``ViTImageProcessor`` / ``BitImageProcessor`` config giving the pixels of a record (the
    inverse of :func:`tocom.data.transforms.hf_record`, for records it can express)."""
    from tocom.data.transforms import HF_RESAMPLE

    codes = {v: k for k, v in HF_RESAMPLE.items()}
    size, resize_size = int(record["size"]), record.get("resize_size")
    if resize_size is None:
        resize_size = size if record["resize"] == "squash" else int(size / record["crop_pct"])
    squash = record["resize"] == "squash"
    kind = "BitImageProcessor" if not squash else \
        "ViTImageProcessor" if resize_size == size else "DeiTImageProcessor"
    return {"image_processor_type": kind,
            "do_resize": True, "resample": codes[record["interpolation"]],
            "size": ({"height": resize_size, "width": resize_size} if squash
                     else {"shortest_edge": resize_size}),
            "do_center_crop": resize_size != size, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(record["mean"]), "image_std": list(record["std"]), "do_convert_rgb": True}

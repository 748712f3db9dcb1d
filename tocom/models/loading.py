"""Building timm models from local checkpoints (safetensors, or .pth with weights_only)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from tocom.atomic import atomic_write
from tocom.models import delta
from tocom.models.metadata import model_kwargs as checked_model_kwargs


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a checkpoint, never unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (a ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper is
    unwrapped). A delta checkpoint (:mod:`tocom.models.delta`) comes back whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open


        try:
            with safe_open(str(path), framework="pt") as f:
                state, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        if delta.is_delta(meta):
            base_state, _ = read_state_dict(delta.find_base(path, meta))
            state, meta = delta.apply_delta(path, state, meta, base_state), delta.strip_delta_metadata(meta)
        check_finite(state, path)
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} could not be loaded with torch.load(weights_only=True) ({err}); "
            "convert it to safetensors or a plain state dict"
        ) from err
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    check_finite(obj, path)
    return obj, {}


def checkpoint_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Classes of the classification head stored in a checkpoint (None when headless)."""
    head = state.get("head.weight")
    return None if head is None else int(head.shape[0])


def create_model(name: str, checkpoint: str | Path | None = None, *, pretrained: bool = False,
                 num_classes: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` plus strict loading of a local checkpoint.

    Args:
        name: a timm model name (e.g. ``deit_tiny_patch16_224``).
        checkpoint: local weights; the head size is taken from it unless ``num_classes`` is given.
            Metadata written by ``tocom finetune`` (``model_kwargs``) is honoured.
        pretrained: timm's hub download (needs internet).

    Raises:
        ValueError: when the checkpoint does not fit the architecture (names the keys).
    """
    if checkpoint is None:
        kw = dict(kwargs)
        if num_classes is not None:
            kw["num_classes"] = num_classes
        return timm.create_model(name, pretrained=pretrained, **kw)
    state, meta = read_state_dict(checkpoint)
    return build_model(name, state, meta, checkpoint, num_classes=num_classes, **kwargs)


def build_model(name: str, state: dict[str, torch.Tensor], meta: dict[str, str], source: str | Path, *,
                num_classes: int | None = None, prepare: Callable[[nn.Module], object] | None = None,
                optional: tuple[str, ...] = (), **kwargs) -> nn.Module:
    """Build ``name`` for a checkpoint's tensors and metadata (from :func:`read_state_dict`) and load them.

    Args:
        source: where the tensors came from, for error messages.
        prepare: called on the fresh model before loading, to add modules the state dict holds
            (adapters, modulators).
        optional: key prefixes that may be absent from ``state`` (e.g. ``("head.",)`` when a new
            head is trained); every other key must match in name and shape.
    """
    saved_for = meta.get("model_name")
    if saved_for and saved_for != name:
        raise ValueError(f"checkpoint {source} was saved for {saved_for}, not {name}; pass that model name")
    kw = checked_model_kwargs(meta, source)
    kw.update(kwargs)
    classes = checkpoint_num_classes(state) if num_classes is None else num_classes
    if classes is not None:
        kw["num_classes"] = classes
    elif "head.weight" not in state:
        kw.setdefault("num_classes", 0)
    # Built first without memory, so a checkpoint whose metadata asks for a bigger network than its
    # tensors hold is refused before that network is allocated.
    with torch.device("meta"):
        _check_fits(_create(name, kw, prepare, source), state, name, source, optional)
    model = _create(name, kw, prepare, source)
    model.load_state_dict(state, strict=not optional)
    return model


def _create(name: str, kw: dict, prepare: Callable[[nn.Module], object] | None,
            source: str | Path) -> nn.Module:
    try:
        model = timm.create_model(name, pretrained=False, **kw)
    except TypeError as err:  # a known key this architecture does not take
        raise ValueError(f"checkpoint {source}: its model_kwargs do not fit {name} ({err}); pass the model "
                         "name it was trained with") from None
    if prepare is not None:
        prepare(model)
    return model


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str | Path,
                optional: tuple[str, ...]) -> None:
    own = model.state_dict()
    missing = sorted(k for k in own.keys() - state.keys() if not k.startswith(optional))
    unexpected = sorted(state.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {source} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}; pass the model name it was trained with"
        )


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """ValueError naming the first floating-point tensor of ``state`` that holds NaN or inf."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"checkpoint {source}: tensor {key} holds NaN or inf; the checkpoint is "
                             "broken, re-train or re-export it")


def save_model(model: nn.Module, path: str | Path, name: str, model_kwargs: dict | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights as safetensors with the metadata :func:`create_model` reads back.

    The write is atomic (:func:`tocom.atomic.atomic_write`).
    """
    from safetensors.torch import save_file

    meta = {"model_name": name, "model_kwargs": json.dumps(model_kwargs or {}),
            "num_classes": str(getattr(model, "num_classes", 0)), **(metadata or {})}
    # safetensors refuses shared storage; contiguous copies of each tensor are safe to write.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def write_delta(checkpoint: str | Path, base: str | Path, out: str | Path) -> dict[str, int]:
    """Write ``checkpoint`` as a delta against ``base`` to ``out`` (atomically; see
    :mod:`tocom.models.delta`).

    Returns counts: ``kept`` and ``total`` tensors, ``bytes`` of the file written.
    """
    from safetensors.torch import save_file

    out, base = Path(out), Path(base)
    if out.suffix != ".safetensors":
        raise ValueError(f"a delta is a safetensors file; name it *.safetensors, not {out.name}")
    if out.resolve() in (base.resolve(), Path(checkpoint).resolve()):
        raise ValueError(f"--out {out} would overwrite its own base or checkpoint; write it elsewhere")
    state, meta = read_state_dict(checkpoint)
    base_state, _ = read_state_dict(base)
    kept, meta = delta.delta_tensors(state, meta, base_state, base)
    atomic_write(out, lambda tmp: save_file(kept, tmp, metadata=meta))
    return {"kept": len(kept), "total": len(state), "bytes": out.stat().st_size}

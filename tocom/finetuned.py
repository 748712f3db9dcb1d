"""Loading any model tocom wrote: plain timm checkpoints and ``tocom finetune`` outputs.

A fine-tuned checkpoint is safetensors whose metadata says how to rebuild the modules its state
dict holds (see :func:`finetune_metadata`):

    model_name, model_kwargs, num_classes   as for any checkpoint (tocom.models.loading)
    method        full | lora | adaptformer | pyra (LoRA is folded in: full and lora are plain)
    schedule      JSON per-block r the model was trained at
    compression   tome | evit, how tokens were reduced during fine-tuning (absent: tome)
    source_degree the int r when the schedule is constant, else null (tocom eval's --source)
    peft          JSON adapter settings (rank, targets, bottleneck, scale)
    recipe        JSON hyper-parameters, wall time, final validation accuracy
    preprocessing JSON evaluation transform it was validated with (tocom.data.preprocessing_record)

Everything that evaluates or serves a checkpoint takes its images through
:func:`eval_transform_for`, so a model fine-tuned on squashed VTAB images is not evaluated on
centre crops (that mismatch once cost a model 11 points at r = 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from tocom.data import preprocessing_record, transform_from_record
from tocom.models import patch
from tocom.models.loading import build_model, create_model, read_state_dict
from tocom.models.metadata import json_field
from tocom.peft import add_adaptformer
from tocom.pyra import add_pyra

FINETUNE_METHODS = ("full", "lora", "adaptformer", "pyra")


def finetune_metadata(method: str, schedule: list[int], peft: dict[str, Any], recipe: dict[str, Any],
                      preprocessing: dict[str, Any], compression: str = "tome") -> dict[str, str]:
    """The string metadata :func:`load_model` reads back (besides name, kwargs and class count)."""
    constant = schedule[0] if len(set(schedule)) == 1 else None
    return {"method": method, "schedule": json.dumps(schedule), "source_degree": json.dumps(constant),
            "peft": json.dumps(peft), "recipe": json.dumps(recipe),
            "preprocessing": json.dumps(preprocessing), "compression": compression}


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """A checkpoint's string metadata without reading its tensors ({} for ``.pth`` files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def source_degree(meta: dict[str, str]) -> int | None:
    """The constant r a fine-tuned checkpoint was trained at (None: not recorded or not constant)."""
    value = json_field(meta, "source_degree", None, (int, type(None)), "the checkpoint")
    return value if isinstance(value, int) else None


def load_model(name: str, checkpoint: str | Path | None = None, pretrained: bool = False) -> nn.Module:
    """Rebuild and strictly load a plain or ``tocom finetune`` checkpoint.

    Fine-tuned checkpoints come back patched with ToMe at the schedule they were trained at,
    with their AdaptFormer adapters or PYRA modulators in place; plain ones as the timm model
    (:func:`tocom.models.loading.create_model`). Change the degree with ``model.r`` as usual;
    a PYRA model only runs at its own schedule (its modulators have one weight per pair).
    """
    if checkpoint is None:
        return create_model(name, pretrained=pretrained)
    state, meta = read_state_dict(checkpoint)
    method = meta.get("method")
    if method is not None and method not in FINETUNE_METHODS:
        raise ValueError(f"{checkpoint} records method {method!r}, which this tocom does not know "
                         f"({', '.join(FINETUNE_METHODS)}); upgrade tocom")
    peft = json_field(meta, "peft", {}, dict, checkpoint)
    schedule = json_field(meta, "schedule", None, (int, list), checkpoint)
    if method == "adaptformer" and not (isinstance(peft.get("bottleneck"), int)
                                        and isinstance(peft.get("scale"), (int, float))):
        raise ValueError(f"{checkpoint}: its peft metadata lacks an int bottleneck and a numeric scale for "
                         "AdaptFormer; re-export the checkpoint")

    def prepare(model: nn.Module) -> None:
        if "schedule" in meta:
            patch(model, meta.get("compression", "tome"))
            model.r = schedule
        if method == "adaptformer":
            add_adaptformer(model, bottleneck=peft["bottleneck"], scale=peft["scale"])
        elif method == "pyra":
            add_pyra(model)  # random W_r / zero W_D, overwritten by the strict load below

    return build_model(name, state, meta, checkpoint, prepare=prepare)


def recorded_preprocessing(meta: dict[str, str], model: nn.Module) -> dict[str, Any]:
    """The evaluation preprocessing a checkpoint was validated with (a preprocessing record).

    Checkpoints written before the record existed are read by their recipe: a ``squash`` recipe
    validated on squashed images. Plain checkpoints (no tocom recipe) use timm's resize and crop.
    """
    if "preprocessing" in meta:
        return json_field(meta, "preprocessing", {}, dict, "the checkpoint")
    augment = json_field(meta, "recipe", {}, dict, "the checkpoint").get("augment")
    return preprocessing_record("squash" if augment in ("squash", "none") else "crop", model)


def eval_transform_for(checkpoint: str | Path | None, model: nn.Module, resize: str | None = None):
    """The transform to evaluate ``model`` (loaded from ``checkpoint``) with: PIL -> ``(3, S, S)``.

    ``resize`` (``"crop"`` / ``"squash"``) overrides the recorded choice, keeping its size and
    normalisation; None uses the record.
    """
    meta = checkpoint_metadata(checkpoint) if checkpoint is not None else {}
    record = recorded_preprocessing(meta, model)
    if resize is not None and resize != record["resize"]:
        record = {**preprocessing_record(resize, model, record["size"]), "mean": record["mean"],
                  "std": record["std"]}
    return transform_from_record(record)

"""``tocom eval``: a checkpoint's accuracy (mIoU for a segmentation checkpoint) at each target degree,
with and without a plugin, preprocessed as the checkpoint records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tocom.compensator import Compensator
from tocom.data import load_dataset, transform_from_record
from tocom.finetuned import checkpoint_metadata, eval_transform_for, load_model, source_degree
from tocom.jobs.evaluate import make_loader, sweep, sweep_at_selected_scales
from tocom.jobs.segment import run_segment_eval
from tocom.models import patch, unpatch
from tocom.models.hf_load import architecture, hf_preprocessing, is_hf


@dataclass
class EvalConfig:
    """What :func:`run_eval` measures; the ``tocom eval`` flags map one to one onto these fields
    (``--target`` is ``targets``, ``--scale`` is ``scales``, ``--workers`` is ``num_workers``)."""

    model_name: str
    data: str | Path  # a VTAB-1k folder or ImageFolder splits (ADE20k layout for segmentation)
    checkpoint: str | None = None
    pretrained: bool = False
    split: str = "test"
    targets: Sequence[int] = field(default_factory=lambda: [0, 4, 8, 12, 16])
    source: int | None = None  # None: the checkpoint's recorded degree, else 0
    plugin: str | None = None
    scales: Sequence[float] | None = None  # None: the plugin's own scale
    select_scale_on: str | None = None  # "val": pick the scale per target on that split
    method: str | None = None  # None: the compression the checkpoint was fine-tuned with, else tome
    resize: str | None = None  # "crop" or "squash" override the recorded preprocessing
    batch_size: int = 64
    num_workers: int = 0  # loader workers compete with the timed forwards for the CPU
    device: str = "cpu"
    progress: bool = True


def hf_model_and_transform(c: EvalConfig, meta: dict[str, str]):
    """An ``hf:`` model (unpatched, returning logits) and its evaluation transform."""
    from tocom.peft.hf import load_finetuned_hf

    if c.pretrained:
        raise ValueError(f"--pretrained downloads timm weights; {c.model_name} holds its own, drop it")
    arch = architecture(c.model_name)  # metadata first: refused before any weight is read
    if "Classification" not in arch:
        raise ValueError(f"{c.model_name} is a {arch}, which has no classifier head; evaluate an "
                         "...ForImageClassification model")
    record = hf_preprocessing(c.model_name, meta, c.resize)
    return load_finetuned_hf(c.model_name, c.checkpoint), transform_from_record(record)


def run_eval(config: EvalConfig) -> list[dict]:
    """One dict per (target, plugin, scale): accuracy in 0..1 (or mIoU), throughput and the split.

    A plugin that does not cover the source or a target, and a head smaller than the data's
    classes, are refused before any image is decoded.
    """
    c = config
    meta = checkpoint_metadata(c.checkpoint) if c.checkpoint else {}
    if meta.get("task") == "segmentation":  # a tocom finetune --task segmentation output: mIoU
        rows = run_segment_eval(c.checkpoint, c.data, c.targets, split=c.split, source=c.source,
                                plugin_file=c.plugin, scales=c.scales, batch_size=c.batch_size,
                                device=c.device, progress=c.progress)
        return [r.as_dict() for r in rows]
    source = c.source if c.source is not None else source_degree(meta) or 0
    # A fine-tuned model comes back unpatched (its PYRA modulators stay in its blocks) and is
    # patched here with the compression it was trained under.
    if is_hf(c.model_name):
        model, transform = hf_model_and_transform(c, meta)
    else:
        model = unpatch(load_model(c.model_name, c.checkpoint, pretrained=c.pretrained)).eval()
        transform = None
    model = patch(model, c.method or meta.get("compression", "tome"))
    plugin = Compensator.load(c.plugin) if c.plugin else None
    for degree in [source, *c.targets] if plugin is not None else []:
        plugin.check_degree(degree)
    transform = transform or eval_transform_for(c.checkpoint, model, c.resize)
    head = getattr(model, "num_classes", 0)

    def rows_for(split, scales, targets):
        data = load_dataset(c.data, split, transform)
        if data.num_classes > head:
            raise ValueError(f"the checkpoint's head has {head} classes but {c.data} has "
                             f"{data.num_classes}; pass the checkpoint fine-tuned on this data")
        return sweep(model, make_loader(data, c.batch_size, c.num_workers), targets, source, plugin, scales,
                     device=c.device, split=split, progress=c.progress)

    if c.select_scale_on:
        if plugin is None:
            raise ValueError("--select-scale-on needs --plugin")
        rows = sweep_at_selected_scales(rows_for, c.scales, c.targets, c.select_scale_on, c.split)
    else:
        rows = rows_for(c.split, c.scales, c.targets)
    return [r.as_dict() for r in rows]

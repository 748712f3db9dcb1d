"""``tocom finetune --task segmentation``: a Segmenter-style linear decoder on a timm ViT, trained on an
ADE20k-layout folder, and mIoU sweeps over degrees with and without a compensator.

The backbone is patched in ``dense`` mode by default (tokens merged before each MLP and unmerged
after it, so every patch keeps its own token); ``standard`` mode traces sources and unmerges the
final tokens instead. Methods: ``full`` (every weight) or ``lora`` (LoRA on the backbone's qkv,
folded into the saved weights); the decoder always trains, at ``decoder_lr_scale`` times the lr.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from tocom.compensator import restoring
from tocom.compress import parse_schedule, resolve_schedule
from tocom.data import SegmentationFolder, SegmentationTransform, data_config
from tocom.jobs.evaluate import apply_config, make_loader, sweep_configs
from tocom.jobs.finetune import add_method
from tocom.models import dims_of, patch
from tocom.models.loading import build_model, read_state_dict
from tocom.models.metadata import model_kwargs as checked_model_kwargs
from tocom.peft import fold
from tocom.seg import Segmenter, SegmentObjective, image_confusions, mean_iou, save_segmenter
from tocom.train import distributed
from tocom.train.config import TrainConfig
from tocom.train.trainer import train

SEG_METHODS = ("full", "lora")


def segmentation_backbone(model_name: str, checkpoint: str | Path | None = None, pretrained: bool = False
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """A headless timm ViT (``num_classes=0``) and the architecture kwargs its checkpoint records;
    a classification head in ``checkpoint`` is dropped."""
    if checkpoint is None:
        from tocom.models.loading import create_model

        return create_model(model_name, pretrained=pretrained, num_classes=0), {}
    state, meta = read_state_dict(checkpoint)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    kwargs = checked_model_kwargs(meta, checkpoint)
    return build_model(model_name, state, meta, checkpoint, num_classes=0), kwargs


def patch_for_segmentation(backbone: nn.Module, mode: str = "dense") -> nn.Module:
    """Patch ``backbone`` with ToMe so that every patch keeps a token: ``dense`` mode, or the
    standard mode with source tracing (the final tokens are unmerged by the decoder)."""
    if mode == "dense":
        return patch(backbone, "tome", mode="dense")
    if mode == "standard":
        return patch(backbone, "tome", trace_source=True)
    raise ValueError(f"mode must be 'dense' or 'standard', got {mode!r}")


class _Objective(SegmentObjective):
    """:class:`SegmentObjective` with a faster decoder: its lr is ``decoder_lr_scale`` times the lr."""

    def __init__(self, model: Segmenter, decoder_lr_scale: float, weight_decay: float):
        super().__init__(model)
        self.decoder_lr_scale, self.weight_decay = decoder_lr_scale, weight_decay

    def optimizer_groups(self) -> list[dict[str, Any]]:
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        return [{"params": [p for p in backbone if p.ndim >= 2], "weight_decay": self.weight_decay},
                {"params": [p for p in backbone if p.ndim < 2], "weight_decay": 0.0},
                {"params": list(self.model.decoder.parameters()), "weight_decay": 0.0,
                 "lr_scale": self.decoder_lr_scale}]


def miou_hook(data, batch_size: int):
    """An ``evaluate(objective, step)`` for :func:`train`: mIoU on this rank's shard of ``data``."""
    shard = Subset(data, range(distributed.rank(), len(data), distributed.world_size()))
    loader = make_loader(shard, batch_size)

    def evaluate(objective: nn.Module, step: int) -> dict[str, float]:
        device = next(objective.parameters()).device
        conf = 0
        for images, masks in loader:
            pred = objective.model(images.to(device)).argmax(1).cpu()
            conf = conf + image_confusions(pred, masks, objective.model.num_classes).sum(0)
        return {"val_miou": mean_iou(conf)}

    return evaluate


@dataclass
class SegmentConfig:
    """What :func:`run_segment_finetune` trains: backbone, data, method, schedule, mode, recipe and run.

    The command line's ``tocom finetune --task segmentation`` flags map onto these fields.
    """

    model_name: str
    data: str | Path  # an ADE20k-layout folder
    checkpoint: str | Path | None = None
    pretrained: bool = False
    method: str = "full"  # or "lora"
    r: str = "0"  # any parse_schedule text
    mode: str = "dense"  # or "standard" (merged tokens are unmerged before the decoder)
    rank: int = 8
    # the recipe
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-4
    decoder_lr_scale: float = 10.0
    weight_decay: float = 0.01
    val_every: int | None = None  # epochs; None: a fifth of them
    seed: int = 0
    # the run
    out: str | Path = "segmenter.safetensors"
    run_dir: str | Path | None = None  # None: OUT.run
    resume: bool = False
    num_workers: int = 2
    device: str | None = None
    progress: bool = True


def run_segment_finetune(config: SegmentConfig) -> tuple[Segmenter, dict[str, Any]]:
    """Fine-tune a Segmenter on the ``train`` split of ``config.data`` (validating mIoU on ``val`` when
    it exists) at schedule ``r`` in ``mode``; write ``out`` and return the model and its recipe."""
    c = config
    if c.method not in SEG_METHODS:
        raise ValueError(f"segmentation fine-tunes with method {' or '.join(SEG_METHODS)}, got {c.method!r}")
    torch.manual_seed(c.seed)  # decoder and LoRA init: identical in a resumed process
    backbone, model_kwargs = segmentation_backbone(c.model_name, c.checkpoint, c.pretrained)
    backbone = patch_for_segmentation(backbone, c.mode)
    cfg = data_config(backbone)
    size = int(cfg["input_size"][-1])
    transform = SegmentationTransform(size, train=True, mean=cfg["mean"], std=cfg["std"])
    train_data = SegmentationFolder(c.data, "train", transform)
    schedule = resolve_schedule(parse_schedule(c.r, dims_of(backbone)), len(backbone.blocks))
    backbone.r = schedule
    model = Segmenter(backbone, train_data.num_classes)
    peft = add_method(backbone, c.method, rank=c.rank)
    model.decoder.requires_grad_(True)
    val_transform = SegmentationTransform(size, mean=cfg["mean"], std=cfg["std"])
    has_val = (Path(c.data) / "images" / "validation").is_dir()
    val_data = SegmentationFolder(c.data, "val", val_transform) if has_val else None
    world = distributed.world_size()
    per_epoch = len(train_data) // (c.batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"{len(train_data)} training images cannot fill one batch of {c.batch_size} x "
                         f"{world} processes; lower --batch-size")
    steps = c.epochs * per_epoch
    val_every = c.val_every or max(1, c.epochs // 5)
    train_config = TrainConfig(steps=steps, lr=c.lr, batch_size=c.batch_size, weight_decay=c.weight_decay,
                               warmup_steps=min(steps, per_epoch), num_workers=c.num_workers,
                               checkpoint_every=per_epoch, seed=c.seed, progress=c.progress,
                               eval_every=val_every * per_epoch if has_val else 0)
    hook = miou_hook(val_data, c.batch_size) if val_data is not None else None
    run_dir = Path(c.run_dir) if c.run_dir else Path(str(c.out) + ".run")
    start = time.time()
    result = train(_Objective(model, c.decoder_lr_scale, c.weight_decay), train_data, train_config,
                   out_dir=run_dir, resume=c.resume, evaluate=hook, device=c.device, stop_after=None)
    recipe = {"task": "segmentation", "method": c.method, "data": str(c.data), "images": len(train_data),
              "classes": train_data.num_classes, "schedule_text": c.r, "mode": c.mode, "epochs": c.epochs,
              "steps": steps, "lr": c.lr, "decoder_lr_scale": c.decoder_lr_scale, "batch_size": c.batch_size,
              "weight_decay": c.weight_decay, "seed": c.seed, "world_size": world,
              "wall_s": round(time.time() - start, 1),
              "val_miou": result.evals[-1]["val_miou"] if result.evals else None,
              "curve": [[e["step"], e["val_miou"]] for e in result.evals]}
    fold(backbone)  # LoRA into the qkv weights
    model = model.cpu().eval()
    if distributed.rank() == 0:
        constant = schedule[0] if len(set(schedule)) == 1 else None
        save_segmenter(model, c.out, c.model_name, model_kwargs, metadata={
            "method": c.method, "schedule": schedule, "source_degree": constant, "mode": c.mode, "peft": peft,
            "classes": train_data.classes, "preprocessing": val_transform.record(), "recipe": recipe})
    return model, recipe


@dataclass
class SegRow:
    """mIoU of one configuration (a degree, with or without the plugin at a scale)."""

    target: int
    source: int
    plugin: bool
    scale: float | None
    miou: float
    pixel_acc: float
    throughput: float  # images/s of the forward passes alone
    split: str = "test"
    confusions: np.ndarray | None = field(default=None, repr=False)  # (N, K, K) per image

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        del row["confusions"]
        return row


@torch.inference_mode()
def segment_sweep(model: Segmenter, loader: DataLoader, targets: Sequence[int], source: int,
                  plugin: nn.Module | None = None, scales: Sequence[float] | None = None,
                  device: str | torch.device = "cpu", split: str = "test", progress: bool = True
                  ) -> list[SegRow]:
    """mIoU of a patched Segmenter at each target, without and (if given) with the plugin.

    Each batch runs through every configuration before the next is loaded. Rows keep the per-image
    confusion matrices ``(N, K, K)`` for paired statistics over images.
    """
    with restoring(model.backbone):  # degree, plugin and scale as they were found
        return _segment_sweep(model, loader, targets, source, plugin, scales, torch.device(device), split,
                              progress)


def _segment_sweep(model, loader, targets, source, plugin, scales, device, split, progress) -> list[SegRow]:
    model.to(device).eval()
    backbone = model.backbone
    configs = sweep_configs(backbone, targets, source, plugin, scales)
    confusions: dict[tuple[int, float | None], list[torch.Tensor]] = {c: [] for c in configs}
    seconds = dict.fromkeys(configs, 0.0)
    seen = 0
    for images, masks in tqdm(loader, desc=f"seg eval {split}", disable=not progress, leave=False):
        images = images.to(device)
        for target, scale in configs:
            apply_config(backbone, target, scale, plugin is not None)
            start = time.perf_counter()
            pred = model(images).argmax(1).cpu()
            seconds[(target, scale)] += time.perf_counter() - start
            confusions[(target, scale)].append(image_confusions(pred, masks, model.num_classes))
        seen += len(images)
    if seen == 0:
        raise ValueError("the evaluation split is empty")
    rows = []
    for (target, scale), parts in confusions.items():
        conf = torch.cat(parts).numpy()
        total = conf.sum(0)
        rows.append(SegRow(target, source, scale is not None, scale, mean_iou(total),
                           float(np.trace(total) / max(total.sum(), 1)), seen / seconds[(target, scale)],
                           split, conf))
    return rows


def run_segment_eval(checkpoint: str | Path, data: str | Path, targets: Sequence[int], *,
                     split: str = "val", source: int | None = None, plugin_file: str | Path | None = None,
                     scales: Sequence[float] | None = None, batch_size: int = 16,
                     device: str | torch.device = "cpu", progress: bool = True) -> list[SegRow]:
    """mIoU of a :func:`run_segment_finetune` checkpoint on ``split`` of ``data`` at each target,
    in the mode and with the preprocessing it was trained with; with a plugin, also with it."""
    from tocom.compensator import Compensator
    from tocom.seg import load_segmenter

    model, meta = load_segmenter(checkpoint)
    patch_for_segmentation(model.backbone, meta.get("mode", "dense"))
    source = (meta.get("source_degree") or 0) if source is None else source
    record = meta["preprocessing"]
    transform = SegmentationTransform(record["size"], mean=record["mean"], std=record["std"])
    dataset = SegmentationFolder(data, split, transform)
    if dataset.num_classes != model.num_classes:
        raise ValueError(f"the checkpoint's decoder has {model.num_classes} classes but {data} has "
                         f"{dataset.num_classes}; pass the checkpoint fine-tuned on this data")
    plugin = Compensator.load(plugin_file) if plugin_file is not None else None
    return segment_sweep(model, make_loader(dataset, batch_size), list(targets), source, plugin, scales,
                         device=device, split=split, progress=progress)

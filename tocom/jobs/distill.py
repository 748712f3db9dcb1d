"""``tocom distill``: train a compensator for a backbone on any folder of images.

Presets: ``paper`` is ToCom's recipe (AdamW, lr 1e-3 per 512 images of batch, weight decay 0.05,
cosine, no warm-up, DeiT augmentation, mixed precision where the device has it); ``small`` suits
a few thousand images on a CPU (light augmentation, batch 32, lr 1e-3, a few hundred steps).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from tocom.atomic import atomic_write
from tocom.compensator import Compensator, DistillObjective
from tocom.data import ImageFiles, eval_transform, train_transform, transform_from_record
from tocom.jobs.evaluate import make_loader
from tocom.models import patch, require_feature
from tocom.models.hf_load import hf_preprocessing, is_hf
from tocom.models.loading import create_model
from tocom.train import distributed
from tocom.train.config import TrainConfig, lr_per_512
from tocom.train.trainer import logged_evals, train


@dataclass(frozen=True)
class DistillPreset:
    batch_size: int
    lr_per_512: float | None  # lr scales with batch (paper); None: use ``lr``
    lr: float
    weight_decay: float
    augment: str
    epochs: int


PRESETS = {
    "paper": DistillPreset(batch_size=512, lr_per_512=1e-3, lr=1e-3, weight_decay=0.05, augment="deit",
                           epochs=10),
    "small": DistillPreset(batch_size=32, lr_per_512=None, lr=1e-3, weight_decay=0.05, augment="light",
                           epochs=8),
}


class LabelledFiles(Dataset):
    """Images of a folder with labels from ``labels.txt`` (``FILE CLASS``) when present, else 0.

    ``require_labels``: refuse a folder without ``labels.txt`` or with an image it does not list
    (the ``ce`` loss would otherwise learn that every image is class 0).
    """

    def __init__(self, root: str | Path, transform, decode_once: bool = False, require_labels: bool = False):
        self.files = ImageFiles(root, transform, decode_once=decode_once)
        labels_file = Path(root) / "labels.txt"
        self.labels: dict[str, int] = {}
        if labels_file.is_file():
            for i, line in enumerate(labels_file.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise ValueError(f"{labels_file}:{i}: expected 'FILE CLASS', got {line!r}")
                self.labels[parts[0]] = int(parts[1])
        if require_labels:
            if not labels_file.is_file():
                raise FileNotFoundError(f"{labels_file} is missing: this loss trains on labels; write one "
                                        "'FILE CLASS' line per image there, or use loss 'kd' (no labels)")
            missing = [str(f.relative_to(self.files.root)) for f in self.files.files
                       if str(f.relative_to(self.files.root)) not in self.labels]
            if missing:
                raise ValueError(f"{labels_file} has no label for {len(missing)} of {len(self.files)} images "
                                 f"(first: {missing[0]}); add a 'FILE CLASS' line for each")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image, _ = self.files[i]
        return image, self.labels.get(str(self.files.files[i].relative_to(self.files.root)), 0)


@dataclass
class DistillConfig:
    """What :func:`run_distill` trains: the model, the data, the plugin's shape, the recipe and the run.

    ``None`` for ``epochs``, ``batch_size`` or ``lr`` takes the preset's value (``lr`` scaled per
    512 images where the preset says so); ``steps`` overrides ``epochs``. The command line's
    ``tocom distill`` flags map one to one onto these fields.
    """

    model_name: str
    data: str | Path  # any folder of images; labels only for loss "ce"
    checkpoint: str | None = None
    pretrained: bool = False
    # the plugin
    method: str = "tome"  # the compression it compensates: one of tocom.models.COMPRESSION_METHODS
    mode: str = "standard"  # or "dense" (segmentation: L1 on every token's features)
    max_r: int = 16
    groups: int | None = None  # None: max_r groups, one per unit of degree
    rank: int = 2
    scale: float = 0.1
    variant: str = "standard"  # or "shared", "no_inversion" (paper Table 5)
    loss: str = "kd"  # or "ce", "feat"
    # the recipe
    preset: str = "small"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    # held-out scoring along training
    holdout: str | Path | None = None
    holdout_pairs: Sequence[tuple[int, int]] | None = None
    eval_every: int = 0
    # the run
    out: str | Path = "compensator.tocom.safetensors"
    run_dir: str | Path | None = None  # None: OUT.run
    resume: bool = False
    checkpoint_every: int = 50
    num_workers: int = 2
    device: str | None = None
    decode_once: bool = False
    progress: bool = True


def run_distill(config: DistillConfig) -> tuple[Compensator, dict]:
    """Distil a plugin and write it to ``config.out``; returns it and a summary of the run.

    With ``holdout`` (a folder of images not in ``data``), the distillation loss of each
    ``holdout_pairs`` (src, tgt) is measured on it before training (the plugin's delta is zero
    then: the loss of compression alone), every ``eval_every`` steps and at the end; the summary's
    ``holdout_curve`` lists them. The default pairs are (0, m), (m, 0), (0, m/2) and (m/2, m) for
    ``max_r`` m: (0, 16), (16, 0), (0, 8) and (8, 16) for the usual 16. ``decode_once`` keeps the
    decoded training images in memory (see :class:`tocom.data.ImageFiles`), for small folders on a
    fast accelerator.
    """
    c = config
    if c.preset not in PRESETS:
        raise ValueError(f"unknown preset {c.preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[c.preset]
    batch_size = c.batch_size or p.batch_size
    lr = c.lr
    if lr is None:
        lr = lr_per_512(p.lr_per_512, batch_size * distributed.world_size()) if p.lr_per_512 else p.lr
    if is_hf(c.model_name):
        model, record = _hf_model(c)
        train_tf = train_transform(p.augment, img_size=record["size"], mean=tuple(record["mean"]),
                                   std=tuple(record["std"]))
        eval_tf = transform_from_record(record)
    else:
        model = create_model(c.model_name, c.checkpoint, pretrained=c.pretrained).eval()
        train_tf, eval_tf = train_transform(p.augment, model_or_cfg=model), eval_transform(model)
    model = patch(model, c.method, mode=c.mode)
    groups = c.groups or c.max_r
    if c.max_r > groups:
        raise ValueError(f"--max-r {c.max_r} needs at least that many groups, got --groups {groups}")
    torch.manual_seed(c.seed)  # A's random init: the same seed must give the same plugin
    plugin = Compensator.init_for(model, groups=groups, rank=c.rank, scale=c.scale, method=c.method,
                                  variant=c.variant, arch=c.model_name, mode=c.mode)
    needs_labels = c.loss == "ce"
    dataset = LabelledFiles(c.data, train_tf, decode_once=c.decode_once, require_labels=needs_labels)
    steps = c.steps
    if steps is None:
        steps = max(1, (c.epochs or p.epochs) * (len(dataset) // (batch_size * distributed.world_size())))
    train_config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, weight_decay=p.weight_decay,
                               num_workers=c.num_workers, checkpoint_every=c.checkpoint_every, seed=c.seed,
                               progress=c.progress, eval_every=c.eval_every if c.holdout is not None else 0)
    objective = DistillObjective(model, plugin, max_r=c.max_r, loss=c.loss)
    run_dir = Path(c.run_dir) if c.run_dir else Path(str(c.out) + ".run")
    hook = None
    if c.holdout is not None:
        half = c.max_r // 2
        pairs = c.holdout_pairs or ((0, c.max_r), (c.max_r, 0), (0, half), (half, c.max_r))
        for pair in pairs:
            plugin.check_degree(max(pair))
        held = LabelledFiles(c.holdout, eval_tf, require_labels=needs_labels)
        hook = holdout_hook(held, pairs, batch_size)
    start = time.time()
    curve = []
    # compression alone, scored before the first step and kept in the run folder for a resume (the
    # plugin is still at its seeded start here, so a folder from before step0.json gets it anew)
    step0 = run_dir / "step0.json"
    if hook is not None and c.resume and step0.is_file():
        curve.append(json.loads(step0.read_text()))
    elif hook is not None:
        curve.append({"step": 0, **_at_device(hook, objective, c.device)})
        if distributed.rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(step0, lambda tmp: Path(tmp).write_text(json.dumps(curve[0])))
    result = train(objective, dataset, train_config, out_dir=run_dir, resume=c.resume, device=c.device,
                   evaluate=hook)
    # A resumed run's own result lacks the evaluations made before the interruption; the log has them.
    curve += logged_evals(run_dir) if c.resume else result.evals
    objective.release()
    summary = {
        "model": c.model_name, "data": str(c.data), "images": len(dataset), "preset": c.preset,
        "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": p.weight_decay,
        "augment": p.augment,
        "loss": "l1_tokens" if c.mode == "dense" and c.loss == "kd" else c.loss, "mode": c.mode,
        "max_r": c.max_r, "seed": c.seed, "wall_s": round(time.time() - start, 1),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "world_size": distributed.world_size(),
    }
    if curve:
        summary["holdout_curve"] = curve
    plugin.spec.recipe.update(summary)
    plugin = plugin.cpu()
    if distributed.rank() == 0:
        plugin.save(c.out)
    return plugin, summary


def _hf_model(c: DistillConfig) -> tuple[nn.Module, dict]:
    """An ``hf:`` backbone (refused at once when its adapter has no per-call degree, which distillation
    needs) and its preprocessing record."""
    from tocom.finetuned import checkpoint_metadata
    from tocom.peft.hf import load_finetuned_hf

    if c.pretrained:
        raise ValueError(f"--pretrained downloads timm weights; {c.model_name} holds its own, drop it")
    model = load_finetuned_hf(c.model_name, c.checkpoint)
    require_feature(model, "per_call", "compensator distillation (a per-call q/v delta)")
    meta = checkpoint_metadata(c.checkpoint) if c.checkpoint else {}
    return model, hf_preprocessing(c.model_name, meta)


def holdout_hook(data: Dataset, pairs: Sequence[tuple[int, int]], batch_size: int):
    """An ``evaluate(objective, step)`` for :func:`train`: the mean loss of each pair on ``data``."""
    loader = make_loader(data, batch_size)

    @torch.no_grad()
    def evaluate(objective: nn.Module, step: int) -> dict[str, float]:
        device = next(objective.parameters()).device
        scores = {}
        for src, tgt in pairs:
            total = seen = 0.0
            for images, labels in loader:
                loss = objective.pair_loss(images.to(device), labels.to(device), src, tgt)
                total += float(loss) * len(images)
                seen += len(images)
            scores[f"loss_{src}_to_{tgt}"] = total / seen
        return scores

    return evaluate


def _at_device(hook, objective: nn.Module, device: str | None) -> dict[str, float]:
    """The hook's scores before training, on the device training will use."""
    objective.to(torch.device(device) if device else distributed.default_device()).eval()
    return hook(objective, 0)

"""``tocom demo``: the whole story in one offline command, in minutes on a CPU.

1. A backbone: the real DeiT-Tiny when ``--checkpoint`` is given or the shared folder
   (``--shared``, ``$TOCOM_SHARED``) holds its weights; otherwise a small ViT the demo pre-trains
   itself on generated structured tasks.
2. A compensator distilled for it on "pre-training" images (the ImageNet sample, or generated).
3. A downstream model fine-tuned at source degree 0 (CIFAR-10 in VTAB-1k format, or a
   generated task the backbone never saw).
4. Accuracy and throughput of that model at several target degrees, with and without the plugin:
   a table on stdout, ``results.json`` and ``accuracy.png`` in the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from tocom.compensator import Compensator
from tocom.data import load_dataset, make_task, shared_dir, train_transform, write_vtab
from tocom.finetuned import eval_transform_for, load_model
from tocom.jobs.distill import DistillConfig, run_distill
from tocom.jobs.evaluate import make_loader, sweep
from tocom.jobs.finetune import ClassifyObjective, FinetuneConfig, run_finetune
from tocom.models import patch
from tocom.models.loading import save_model
from tocom.report.plots import accuracy_plot
from tocom.report.tables import format_table
from tocom.train.config import TrainConfig
from tocom.train.trainer import train

DEIT = "deit_tiny_patch16_224"
SMALL_VIT = "vit_tiny_patch16_224"
SMALL_KWARGS = dict(img_size=64, patch_size=8, depth=6, embed_dim=96, num_heads=3)
PRETRAIN_TASKS = ("count", "orientation", "shape")
DOWNSTREAM_TASK = "location"


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs on, decided once from what is on disk."""

    model_name: str
    checkpoint: Path | None
    distill_data: Path
    downstream: Path
    max_r: int
    targets: tuple[int, ...]
    distill_steps: int
    finetune_epochs: int
    eval_images: int
    real: bool
    finetune_lr: float | None = None  # None: the preset's


class _OffsetLabels(Dataset):
    def __init__(self, data: Dataset, offset: int):
        self.data, self.offset = data, offset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, label = self.data[i]
        return image, label + self.offset


def pretrain_small_vit(out: Path, steps: int = 400, progress: bool = True) -> Path:
    """Pre-train a small ViT from scratch on the union of generated tasks; returns its checkpoint."""
    import timm

    tasks = [make_task(name, 1500, seed=i, image_size=64) for i, name in enumerate(PRETRAIN_TASKS)]
    classes = sum(t.num_classes for t in tasks)
    torch.manual_seed(0)
    model = timm.create_model(SMALL_VIT, pretrained=False, num_classes=classes, **SMALL_KWARGS)
    tf = train_transform("squash", img_size=64, model_or_cfg=model)
    parts, offset = [], 0
    for task in tasks:
        task.transform = tf
        parts.append(_OffsetLabels(task, offset))
        offset += task.num_classes
    config = TrainConfig(steps=steps, lr=1e-3, batch_size=64, weight_decay=0.05, warmup_steps=steps // 10,
                         checkpoint_every=100, num_workers=0, progress=progress)
    train(ClassifyObjective(model), ConcatDataset(parts), config, out_dir=out / "pretrain.run")
    return save_model(model.eval(), out / "backbone.safetensors", SMALL_VIT, SMALL_KWARGS,
                      {"recipe": json.dumps({"pretrain_tasks": PRETRAIN_TASKS, "steps": steps})})


def plan_demo(out: Path, checkpoint: str | None, quick: bool, progress: bool,
              shared: str | Path | None = None) -> DemoPlan:
    """Real weights and data when the shared folder (``shared``, else ``$TOCOM_SHARED``) holds them,
    generated ones otherwise."""
    folder = shared_dir(shared)
    weights = Path(checkpoint) if checkpoint else None
    if weights is None and folder is not None:
        weights = folder / "weights" / f"{DEIT}.safetensors"
    if weights is not None and weights.is_file() and folder is not None and (folder / "data").is_dir():
        return DemoPlan(DEIT, weights, folder / "data/imagenet-sample", folder / "data/vtab-1k/cifar10",
                        max_r=16, targets=(0, 4, 8, 12, 16), distill_steps=20 if quick else 120,
                        finetune_epochs=1 if quick else 4, eval_images=100 if quick else 500, real=True)
    missing = ("no shared folder (pass --shared DIR or set TOCOM_SHARED)" if folder is None
               else f"no DeiT-Tiny weights and data under {folder}")
    print(f"({missing}: pre-training a small ViT on generated tasks instead)")
    backbone = pretrain_small_vit(out, steps=60 if quick else 400, progress=progress)
    images = out / "pretrain-images"  # unlabelled images of the pre-training distribution
    if not images.is_dir():
        for i, name in enumerate(PRETRAIN_TASKS):
            (images / name).mkdir(parents=True, exist_ok=True)
            for j, pixels in enumerate(make_task(name, 200, seed=100 + i, image_size=64).images):
                Image.fromarray(pixels).save(images / name / f"{j:04d}.png")
    downstream = out / DOWNSTREAM_TASK
    if not (downstream / "test.txt").is_file():
        write_vtab(DOWNSTREAM_TASK, downstream, seed=7, image_size=64, n_train=800, n_val=200, n_test=1000)
    return DemoPlan(SMALL_VIT, backbone, images, downstream, max_r=8, targets=(0, 2, 4, 6, 8),
                    distill_steps=30 if quick else 200, finetune_epochs=1 if quick else 8,
                    eval_images=200 if quick else 1000, real=False, finetune_lr=1e-3)


def run_demo(out: str | Path = "demo-out", checkpoint: str | None = None, plugin_file: str | None = None,
             quick: bool = False, progress: bool = True, shared: str | Path | None = None) -> list[dict]:
    """Run the four steps; returns the result rows (also written to ``out/results.json``). ``shared``
    is the folder of the real weights and data (default ``$TOCOM_SHARED``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    plan = plan_demo(out, checkpoint, quick, progress, shared)
    print(f"[demo] backbone {plan.model_name} ({'real weights' if plan.real else 'pre-trained here'})")

    if plugin_file:
        plugin, distill_note = Compensator.load(plugin_file), f"loaded from {plugin_file}"
    else:
        print(f"[demo] distilling a compensator on {plan.distill_data} ({plan.distill_steps} steps)")
        plugin, summary = run_distill(DistillConfig(plan.model_name, plan.distill_data,
                                                    checkpoint=plan.checkpoint, max_r=plan.max_r,
                                                    steps=plan.distill_steps, batch_size=32, lr=1e-3,
                                                    out=out / "compensator.tocom.safetensors",
                                                    run_dir=out / "distill.run", num_workers=2,
                                                    progress=progress))
        distill_note = f"distilled here: {summary['steps']} steps, {summary['wall_s']} s"

    print(f"[demo] fine-tuning on {plan.downstream} at source r = 0 ({plan.finetune_epochs} epochs)")
    finetuned = out / "finetuned_r0.safetensors"
    _, recipe = run_finetune(FinetuneConfig(plan.model_name, plan.downstream, checkpoint=plan.checkpoint,
                                            method="full", r="0", epochs=plan.finetune_epochs,
                                            lr=plan.finetune_lr, out=finetuned, run_dir=out / "finetune.run",
                                            num_workers=2, progress=progress))

    print(f"[demo] evaluating at r = {list(plan.targets)} with and without the plugin")
    model = patch(load_model(plan.model_name, finetuned))
    test = load_dataset(plan.downstream, "test", eval_transform_for(finetuned, model))
    step = max(1, len(test) // plan.eval_images)
    subset = Subset(test, range(0, step * plan.eval_images, step)[: len(test)])
    rows = [r.as_dict() for r in sweep(model, make_loader(subset, 50), plan.targets, 0, plugin,
                                       progress=progress)]
    report = {"plan": {k: str(v) for k, v in plan.__dict__.items()}, "distill": distill_note,
              "finetune_val_acc": recipe.get("val_acc"), "eval_images": len(subset),
              "wall_s": round(time.time() - start, 1), "rows": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    curves = {"without plugin": [], "with ToCom plugin": []}
    for row in rows:
        label = "with ToCom plugin" if row["plugin"] else "without plugin"
        curves[label].append((row["target"], row["accuracy"]))
    accuracy_plot(curves, out / "accuracy.png",
                  title=f"{plan.model_name} fine-tuned at r=0 on {plan.downstream.name}")
    table = [{"target r": r["target"], "plugin": "yes" if r["plugin"] else "no",
              "top-1 %": f"{100 * r['accuracy']:.1f}", "images/s": f"{r['throughput']:.1f}"} for r in rows]
    print(format_table(sorted(table, key=lambda t: (t["target r"], t["plugin"]))))
    print(f"[demo] {len(subset)} test images; plugin {distill_note}; total {report['wall_s']} s; "
          f"wrote {out / 'results.json'} and {out / 'accuracy.png'}")
    return rows

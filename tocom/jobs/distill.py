"""``tocom distill``: train a compensator for a backbone on any folder of images.

Presets: ``paper`` is ToCom's recipe (AdamW, lr 1e-3 per 512 images of batch, weight decay 0.05,
cosine, no warm-up, DeiT augmentation, mixed precision where the device has it); ``small`` suits
a few thousand images on a CPU (light augmentation, batch 32, lr 1e-3, a few hundred steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tocom.compensator import Compensator, DistillObjective
from tocom.data import ImageFiles, train_transform
from tocom.models import patch
from tocom.models.loading import create_model
from tocom.train import distributed
from tocom.train.config import TrainConfig, lr_per_512
from tocom.train.trainer import train


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
    """Images of a folder with labels from ``labels.txt`` (``FILE CLASS``) when present, else 0."""

    def __init__(self, root: str | Path, transform):
        self.files = ImageFiles(root, transform)
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

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image, _ = self.files[i]
        return image, self.labels.get(str(self.files.files[i].relative_to(self.files.root)), 0)


def run_distill(model_name: str, data: str | Path, *, checkpoint: str | None = None, pretrained: bool = False,
                method: str = "tome", max_r: int = 16, groups: int | None = None, rank: int = 2,
                scale: float = 0.1, variant: str = "standard", loss: str = "kd", preset: str = "small",
                epochs: int | None = None, steps: int | None = None, batch_size: int | None = None,
                lr: float | None = None, out: str | Path = "compensator.tocom.safetensors",
                run_dir: str | Path | None = None, resume: bool = False, num_workers: int = 2,
                checkpoint_every: int = 50, device: str | None = None, seed: int = 0,
                progress: bool = True) -> tuple[Compensator, dict]:
    """Distil a plugin and write it to ``out``; returns it and a summary of the run."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    batch_size = batch_size or p.batch_size
    if lr is None:
        lr = lr_per_512(p.lr_per_512, batch_size * distributed.world_size()) if p.lr_per_512 else p.lr
    model = patch(create_model(model_name, checkpoint, pretrained=pretrained).eval(), method)
    groups = groups or max_r
    if max_r > groups:
        raise ValueError(f"--max-r {max_r} needs at least that many groups, got --groups {groups}")
    torch.manual_seed(seed)  # A's random init: the same seed must give the same plugin
    plugin = Compensator.init_for(model, groups=groups, rank=rank, scale=scale, method=method,
                                  variant=variant, arch=model_name)
    dataset = LabelledFiles(data, train_transform(p.augment, model_or_cfg=model))
    if steps is None:
        steps = max(1, (epochs or p.epochs) * (len(dataset) // (batch_size * distributed.world_size())))
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, weight_decay=p.weight_decay,
                         num_workers=num_workers, checkpoint_every=checkpoint_every, seed=seed,
                         progress=progress)
    objective = DistillObjective(model, plugin, max_r=max_r, loss=loss)
    run_dir = Path(run_dir) if run_dir else Path(str(out) + ".run")
    start = time.time()
    result = train(objective, dataset, config, out_dir=run_dir, resume=resume, device=device)
    objective.release()
    summary = {
        "model": model_name, "data": str(data), "images": len(dataset), "preset": preset, "steps": steps,
        "batch_size": batch_size, "lr": lr, "weight_decay": p.weight_decay, "augment": p.augment,
        "loss": loss, "max_r": max_r, "seed": seed, "wall_s": round(time.time() - start, 1),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "world_size": distributed.world_size(),
    }
    plugin.spec.recipe.update(summary)
    plugin = plugin.cpu()
    if distributed.rank() == 0:
        plugin.save(out)
    return plugin, summary

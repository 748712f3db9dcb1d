"""What a training run is: :class:`TrainConfig`, the lr schedule, the optimiser and AMP choice.

Pure functions of the config, kept apart from the loop so they can be tested and reused
(e.g. an evaluation script asking what lr a checkpoint was at).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

_AMP = ("auto", "off", "bf16", "fp16")
# Fields that do not change the trajectory, so a resumed run may change them.
_RESUME_FREE = frozenset({"checkpoint_every", "eval_every", "log_every", "progress", "num_workers"})


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in checkpoints and checked on resume)."""

    steps: int  # total optimiser steps
    lr: float  # peak learning rate
    batch_size: int  # per rank; the global batch is batch_size * world_size
    weight_decay: float = 0.05  # not applied to 1-D parameters (biases, norms)
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    min_lr: float = 0.0  # cosine decays lr -> min_lr over the steps after warm-up
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None  # max global grad norm
    amp: str = "auto"  # auto = fp16 autocast + GradScaler on CUDA, off on CPU; bf16 works on CPU too
    num_workers: int = 0
    checkpoint_every: int = 100  # steps; 0 = only at the end (or at stop_after)
    eval_every: int = 0  # steps; 0 = only at the end
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    find_unused_parameters: bool = False  # DDP: set when a step may leave trainables unused

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.steps <= 0:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.amp not in _AMP:
            raise ValueError(f"amp must be one of {_AMP}, got {self.amp!r}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.log_every < 1 or self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("log_every must be >= 1; checkpoint_every and eval_every >= 0")
        if self.seed < 0 or self.num_workers < 0:
            raise ValueError("seed and num_workers must be >= 0")


def lr_per_512(lr: float, global_batch: int) -> float:
    """The papers' rule: ``lr`` is given per 512 images and scales linearly with the global batch."""
    return lr * global_batch / 512


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warm-up, then cosine to ``min_lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps  # step 0 already learns
    t = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * t))


def build_optimizer(objective: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable params; 1-D tensors (biases, norm scales) get no weight decay."""
    custom = getattr(objective, "optimizer_groups", None)
    if callable(custom):
        groups = [dict(g) for g in custom()]
    else:
        trainable = [p for p in objective.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
    groups = [g for g in groups if len(list(g["params"])) > 0]
    if not groups:
        raise ValueError("objective has no parameters with requires_grad=True: nothing to train")
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g.setdefault("weight_decay", config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def resolve_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use GradScaler)`` for an ``amp`` setting on ``device``."""
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device, got {device}; use amp='bf16' or 'off'")
    return {"off": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[amp]


def check_resumable(ckpt: dict[str, Any], config: TrainConfig, world_size: int) -> None:
    """Raise naming the first config field (or world size) that differs from the checkpoint's."""
    for name, value in asdict(config).items():
        if name in _RESUME_FREE:
            continue
        saved = ckpt["config"].get(name)
        if (tuple(saved) if isinstance(saved, list) else saved) != value:
            raise ValueError(
                f"cannot resume: config.{name} is {value!r} but the checkpoint was trained with "
                f"{saved!r}; use the original value or a new out_dir"
            )
    if ckpt["world_size"] != world_size:
        raise ValueError(
            f"cannot resume: checkpoint was written by {ckpt['world_size']} processes, this run has "
            f"{world_size}; data shards and the global batch would change"
        )

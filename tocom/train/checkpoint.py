"""Checkpoints for the training engine: atomic, ``weights_only``-loadable, trainable state only.

A checkpoint (``torch.save`` dict) holds
  ``model``      trainable parameters (``requires_grad``) and persistent buffers of the objective;
                 frozen parameters are *not* stored: the caller rebuilds them (e.g. pretrained
                 weights) exactly as in the first run,
  ``optimizer``, ``scaler``  their ``state_dict()``,
  ``step``       optimiser steps done, ``world_size``, ``config`` (``asdict(TrainConfig)``),
  ``rng``        one entry per rank: torch CPU / CUDA, ``random`` and numpy states as tensors and
                 plain types, so ``torch.load(weights_only=True)`` accepts the file.
Writes go to a temporary file in the target directory, are fsynced, then ``os.replace``d, so a
crash leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tocom.atomic import atomic_write


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (tmp file in the same dir + fsync + ``os.replace``)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors / plain types (``weights_only``-safe)."""
    version, mt, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": (version, torch.tensor(mt, dtype=torch.int64), gauss),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` entries of trainable parameters and persistent buffers (e.g. BN statistics)."""
    keep = {n for n, p in module.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in module.named_buffers()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if k in keep}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`trainable_state` dict; every trainable parameter must be covered."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - state.keys())
    if missing:
        raise ValueError(
            f"checkpoint lacks trainable parameters {missing[:5]} (of {len(missing)}); "
            "was it written for a different objective or a different set of trainable layers?"
        )
    own = module.state_dict()
    for name, value in state.items():
        if name not in own:
            raise ValueError(f"checkpoint entry {name!r} does not exist in the objective")
        if own[name].shape != value.shape:
            raise ValueError(f"checkpoint entry {name!r} has shape {tuple(value.shape)}, the objective's "
                             f"has {tuple(own[name].shape)}; was it written for a different model?")
    module.load_state_dict(state, strict=False)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on CPU with ``weights_only=True``; says what to do if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from; run without resume=True to start")
    return torch.load(path, map_location="cpu", weights_only=True)

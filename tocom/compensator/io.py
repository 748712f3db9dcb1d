"""The plugin file: safetensors tensors ``A``, ``B`` plus metadata (shape, scale, recipe)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import torch

from tocom.atomic import atomic_write
from tocom.compensator.bank import CompensatorBank, PluginSpec

T = TypeVar("T", bound=CompensatorBank)


def save_plugin(plugin: CompensatorBank, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file + rename) so a crash never leaves half a plugin."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"A": plugin.A.detach().float().cpu().contiguous(),
               "B": plugin.B.detach().float().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=plugin.spec.to_metadata()))
    return path


def load_plugin(path: str | os.PathLike, cls: type[T] = CompensatorBank) -> T:
    """Read a plugin file into a new ``cls``, checking that the tensors agree with the metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plugin file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable plugin file ({err}); re-download or re-train it") from err
    spec = PluginSpec.from_metadata(meta)
    plugin = cls(spec)
    for name in ("A", "B"):
        expected = getattr(plugin, name).shape
        if name not in tensors or tensors[name].shape != expected:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ValueError(f"{path}: tensor {name} is {got}, its metadata says {tuple(expected)}")
    with torch.no_grad():
        plugin.A.copy_(tensors["A"])
        plugin.B.copy_(tensors["B"])
    return plugin

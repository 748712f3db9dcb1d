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
    """Read a plugin file into a new ``cls``.

    Nothing is allocated before the metadata is checked (types and ranges) and agrees with the
    shapes the file's header gives its tensors, so the tensors themselves bound what a file can
    make us allocate; non-finite values are refused, naming the tensor.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file and what is wrong with it.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plugin file {path} does not exist")
    redo = "; re-download or re-train it"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            spec = PluginSpec.from_metadata(meta, source=str(path))
            if set(f.keys()) != {"A", "B"}:
                raise ValueError(f"{path} holds tensors {sorted(f.keys())[:4]}, not A and B{redo}")
            for name, expected in plugin_shapes(spec).items():
                got = tuple(f.get_slice(name).get_shape())
                if got != expected:
                    raise ValueError(f"{path}: tensor {name} is {got}, its metadata says {expected}{redo}")
            tensors = {name: f.get_tensor(name) for name in ("A", "B")}
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable plugin file ({err}){redo}") from err
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name} is {tensor.dtype}, not floating point{redo}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or inf{redo}")
    plugin = cls(spec)
    with torch.no_grad():
        plugin.A.copy_(tensors["A"])
        plugin.B.copy_(tensors["B"])
    return plugin


def plugin_shapes(spec: PluginSpec) -> dict[str, tuple[int, ...]]:
    """The shapes of ``A`` (L, 2, K, h, in) and ``B`` (L, 2, K, out, h) that ``spec`` declares."""
    k, h = spec.stored_groups, spec.rank
    return {"A": (spec.depth, 2, k, h, spec.embed_dim), "B": (spec.depth, 2, k, spec.attn_dim, h)}

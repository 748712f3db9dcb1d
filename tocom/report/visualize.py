"""Pictures of which patches were merged into which token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tocom.compress import token_assignment


def merge_picture(image: torch.Tensor, source: torch.Tensor, grid: tuple[int, int], num_prefix: int,
                  patch: int) -> Image.Image:
    """Paint each patch with the mean colour of its token's group and outline the groups.

    Args:
        image: (3, H, W) in [0, 1].
        source: (N, N0) membership map of one image (prefix tokens included).
        grid: patch grid (rows, cols).
        patch: patch size in pixels.

    Returns:
        an RGB image of size (cols*patch, rows*patch); pruned patches are black.
    """
    owner = token_assignment(source[None])[0, num_prefix:].view(*grid)
    pixels = image.permute(1, 2, 0).numpy()
    rows, cols = grid
    patches = pixels[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch, 3).mean((1, 3))
    colours = np.zeros((rows, cols, 3), dtype=np.float32)
    for token in owner.unique().tolist():
        if token < 0:
            continue
        mask = (owner == token).numpy()
        colours[mask] = patches[mask].mean(0)
    out = np.repeat(np.repeat(colours, patch, 0), patch, 1)
    own = np.repeat(np.repeat(owner.numpy(), patch, 0), patch, 1)
    edge = np.zeros_like(own, dtype=bool)
    edge[1:, :] |= own[1:, :] != own[:-1, :]
    edge[:, 1:] |= own[:, 1:] != own[:, :-1]
    out[edge] = 1.0
    return Image.fromarray((out.clip(0, 1) * 255).astype(np.uint8))


def visualize(model: torch.nn.Module, image_path: str | Path, out: str | Path,
              preprocessing: dict[str, Any] | None = None) -> Path:
    """Run a model patched with ``trace_source=True`` on one image and save the merge picture.

    ``preprocessing``: a preprocessing record (:func:`tocom.data.transform_from_record`); None uses
    the timm model's own evaluation transform.
    """
    from tocom.data import data_config, eval_transform, transform_from_record
    from tocom.models import dims_of

    if preprocessing is None:
        cfg = data_config(model)
        transform = eval_transform(model)
    else:
        cfg, transform = preprocessing, transform_from_record(preprocessing)
    x = transform(Image.open(image_path).convert("RGB"))[None]
    with torch.inference_mode():
        model(x)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    image = (x[0] * std + mean).clamp(0, 1)
    dims = dims_of(model)
    side = x.shape[-1] // dims.patch_size
    picture = merge_picture(image, model.last_state.source[0], (side, side), dims.num_prefix, dims.patch_size)
    side_by_side = Image.new("RGB", (picture.width * 2, picture.height))
    side_by_side.paste(Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)), (0, 0))
    side_by_side.paste(picture, (picture.width, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side.save(out)
    return out

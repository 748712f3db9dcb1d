"""Pictures of which patches were merged into which token."""

from __future__ import annotations

from pathlib import Path

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


def visualize(model: torch.nn.Module, image_path: str | Path, out: str | Path) -> Path:
    """Run a model patched with ``trace_source=True`` on one image and save the merge picture."""
    from tocom.data import data_config, eval_transform

    cfg = data_config(model)
    x = eval_transform(model)(Image.open(image_path).convert("RGB"))[None]
    with torch.inference_mode():
        model(x)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    image = (x[0] * std + mean).clamp(0, 1)
    patch = model.patch_embed.patch_size[0]
    picture = merge_picture(image, model.last_state.source[0], model.patch_embed.grid_size,
                            model.num_prefix_tokens, patch)
    side_by_side = Image.new("RGB", (picture.width * 2, picture.height))
    side_by_side.paste(Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)), (0, 0))
    side_by_side.paste(picture, (picture.width, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side.save(out)
    return out

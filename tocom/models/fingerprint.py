"""A model's weights as one hash: which fine-tuned model an adapted plugin belongs to."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) over every tensor of ``model.state_dict()``: names, dtypes, shapes and bytes.

    Independent of the device and of tocom's patch (which adds no tensors), so the same checkpoint
    loaded twice gives the same fingerprint; any changed weight, a cast to another dtype, or a
    plugin's folded delta gives another.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()

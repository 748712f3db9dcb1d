"""Restore full-length token sequences from reduced ones, for dense prediction."""

from __future__ import annotations

import torch


def initial_source(batch: int, num_tokens: int, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (B, N0, N0) identity membership map before any reduction."""
    return torch.eye(num_tokens, device=device, dtype=dtype).expand(batch, -1, -1)


def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Copy every reduced token back to each original position it stands for.

    Args:
        x: (B, N, C) reduced tokens.
        source: (B, N, N0) 0/1 map of which original tokens each reduced token holds
            (from a model patched with ``trace_source=True``).

    Returns:
        (B, N0, C); positions that were pruned (EViT without fusing) are zero.
    """
    if source.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"source map {tuple(source.shape)} does not match tokens {tuple(x.shape)}: "
            "pass the source traced by the same forward"
        )
    return source.transpose(1, 2).to(x.dtype) @ x


def token_assignment(source: torch.Tensor) -> torch.Tensor:
    """(B, N0) index of the reduced token that holds each original token; -1 where pruned."""
    owner = source.argmax(dim=1)
    return torch.where(source.amax(dim=1) > 0, owner, torch.full_like(owner, -1))

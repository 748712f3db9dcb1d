"""Validated settings for the parameter-efficient tuners.

Kept apart from the layers so that a config can be checked (and later serialised next to a
checkpoint) without building any module.
"""

from __future__ import annotations

from dataclasses import dataclass

QKV_SLICES = ("q", "k", "v")  # order of the row blocks in timm's fused qkv weight


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the q/k/v slices of a fused ``qkv`` projection.

    Attributes:
        rank: rank r of every low-rank pair (A: r x in, B: D x r); must be > 0.
        targets: non-empty subset of ``("q", "k", "v")``; stored in canonical q, k, v order.
        alpha: the delta is scaled by ``alpha / rank``; ``None`` means ``alpha = rank`` (scale 1).
        dropout: dropout probability applied to the LoRA branch input only, in [0, 1).
    """

    rank: int = 8
    targets: tuple[str, ...] = QKV_SLICES
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in QKV_SLICES]
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}: choose a non-empty subset of {QKV_SLICES}")
        if not targets:
            raise ValueError(f"LoRA targets is empty: choose a non-empty subset of {QKV_SLICES}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"LoRA targets {targets} contain duplicates")
        # Canonical order makes the parameter layout independent of how the user spelled it.
        object.__setattr__(self, "targets", tuple(t for t in QKV_SLICES if t in targets))
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        """Multiplier ``alpha / rank`` applied to every ``B @ A`` delta."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@dataclass(frozen=True)
class AdaptFormerConfig:
    """AdaptFormer parallel bottleneck adapter next to each block's MLP.

    Attributes:
        bottleneck: hidden width of the adapter (down: D -> bottleneck, up: bottleneck -> D); > 0.
        scale: fixed multiplier s on the adapter output.
    """

    bottleneck: int = 32
    scale: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"AdaptFormer bottleneck must be a positive int, got {self.bottleneck!r}")

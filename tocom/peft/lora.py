"""LoRA layer for timm's fused ``qkv`` projection.

timm's ``Attention`` computes q, k and v with one ``nn.Linear(dim, 3 * D)`` whose output rows
``[0:D)``, ``[D:2D)``, ``[2D:3D)`` are q, k and v. :class:`LoRAQKV` replaces that module in its
slot (``attn.qkv``) and adds a low-rank delta to a chosen subset of the three slices:

    qkv(x)[..., slice_t] += scaling * dropout(x) @ A_t^T @ B_t^T      for t in targets
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import QKV_SLICES, LoRAConfig


class LoRAQKV(nn.Module):
    """A fused qkv ``nn.Linear`` plus per-slice LoRA deltas.

    Parameters (T = number of targets, r = rank, D = out_features // 3, C = in_features):
        base: the wrapped ``nn.Linear`` (C -> 3D), kept as-is so its weight can still be
            edited in place (e.g. by a compensator through :func:`tocom.peft.base_linear`).
        lora_A: ``(T, r, C)``, kaiming-uniform init (as in the LoRA paper's reference code).
        lora_B: ``(T, D, r)``, zero init, so the wrapped layer starts as an exact no-op change.
    The stacked layout lets the forward pass do one base matmul, one low-rank matmul for all
    targets together, one batched ``B`` product and one scatter-add, with no per-target loop.
    """

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRAQKV wraps an nn.Linear, got {type(base).__name__}")
        if base.out_features % 3:
            raise ValueError(f"fused qkv out_features must be divisible by 3, got {base.out_features}")
        self.base = base
        self.config = config
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.slice_dim = base.out_features // 3
        self.scaling = config.scaling
        n, r = len(config.targets), config.rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(n, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(n, self.slice_dim, r, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Slice index of each target in the (..., 3, D) view of the output; a buffer so it follows
        # .to(device), non-persistent so it never shows up in checkpoints.
        index = torch.tensor([QKV_SLICES.index(t) for t in config.targets], device=base.weight.device)
        self.register_buffer("target_index", index, persistent=False)
        self.reset_lora_parameters()

    @property
    def targets(self) -> tuple[str, ...]:
        """The adapted slices, in q, k, v order."""
        return self.config.targets

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) per target (fan_in = C), B = 0."""
        for a in self.lora_A:  # init-time loop over <= 3 small matrices; per-2D for the right fan_in
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., C)`` -> ``(..., 3D)``, equal to ``base(x)`` plus the LoRA deltas."""
        out = self.base(x)
        n, r = self.lora_A.shape[:2]
        # (..., C) -> (..., T*r): all targets' A in a single matmul.
        z = F.linear(self.dropout(x), self.lora_A.reshape(n * r, self.in_features))
        z = z.unflatten(-1, (n, r))
        # (..., T, r) x (T, D, r) -> (..., T, D): batched over targets inside one kernel.
        delta = torch.einsum("...tr,tdr->...td", z, self.lora_B) * self.scaling
        # In-place add into the matching slices; linear's backward does not need its output, so
        # this is autograd-safe and avoids allocating a second (..., 3D) tensor.
        out3 = out.unflatten(-1, (3, self.slice_dim))
        out3.index_add_(-2, self.target_index, delta.to(out.dtype))
        return out

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight delta ``(3D, C)`` this layer adds; rows of untargeted slices are 0.

        Returned in ``dtype`` (default: the base weight's dtype). The product is accumulated in
        at least float32 so half-precision weights do not lose precision inside the matmul.
        """
        w = self.base.weight
        acc = _accumulation_dtype(w.dtype)
        delta = torch.zeros(3, self.slice_dim, self.in_features, device=w.device, dtype=acc)
        # (T, D, r) @ (T, r, C) -> (T, D, C)
        per_target = torch.bmm(self.lora_B.to(acc), self.lora_A.to(acc)) * self.scaling
        delta.index_copy_(0, self.target_index, per_target)
        return delta.reshape(3 * self.slice_dim, self.in_features).to(dtype or w.dtype)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """Add :meth:`delta_weight` into ``base.weight`` in place and return ``base``.

        The sum is formed in float32 for half-precision weights and rounded once. After this the
        wrapper must be discarded (its delta would count twice); :func:`tocom.peft.fold` does
        both steps for a whole model.
        """
        w = self.base.weight
        acc = _accumulation_dtype(w.dtype)
        w.copy_((w.to(acc) + self.delta_weight(acc)).to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"targets={self.targets}, rank={self.config.rank}, scaling={self.scaling:g}"


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit floats (whose matmul/add would round early), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

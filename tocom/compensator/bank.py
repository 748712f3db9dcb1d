"""The Token Compensator's arithmetic: a bank of low-rank groups on W_q and W_v of every block.

For a model whose home degree is ``src`` running at ``tgt`` the weight delta of a projection is
``sign(tgt - src) * s * sum_{i=min}^{max-1} B_i A_i`` (zero when equal). Every pair reduces to a
coefficient per stored group, so one code path serves training (a fused masked low-rank product)
and inference (folding ``B diag(c) A`` into the weights).

Variants (paper Table 5): ``standard`` as above; ``shared`` ties all groups to one
(delta = (tgt - src) * s * B A); ``no_inversion`` keeps separate groups for raising and lowering
the degree instead of negating.

This module knows nothing of files, the hub or models: :mod:`tocom.compensator.plugin` builds the
user-facing :class:`~tocom.compensator.Compensator` on top of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tocom.models import COMPRESSION_METHODS, QVDelta
from tocom.models.blocks import MODES
from tocom.models.metadata import short_json

VARIANTS = ("standard", "shared", "no_inversion")
PROJECTIONS = ("q", "v")


@dataclass(frozen=True)
class PluginSpec:
    """Everything that defines a plugin's shape and meaning (stored as file metadata)."""

    arch: str
    embed_dim: int
    depth: int
    num_heads: int
    attn_dim: int
    groups: int = 16
    rank: int = 2
    scale: float = 0.1
    method: str = "tome"
    variant: str = "standard"
    recipe: dict = field(default_factory=dict)
    mode: str = "standard"  # the compression mode it was distilled in (tocom.patch's mode)
    family: str = "timm-vit"  # backbone family (tocom.models.family_of); files before it were all timm-vit
    # Empty for a universal plugin; for one adapted to a fine-tuned model (tocom.adapt): that model's
    # checkpoint and weights fingerprint, its source degree, the images and the recipe.
    adapted: dict = field(default_factory=dict)
    # Protected leading tokens (class, distillation, registers) of the model it was trained on;
    # None in files written before it was recorded.
    num_prefix: int | None = None

    @property
    def max_degree(self) -> int:
        return self.groups

    @property
    def stored_groups(self) -> int:
        return {"standard": self.groups, "shared": 1, "no_inversion": 2 * self.groups}[self.variant]

    def to_metadata(self) -> dict[str, str]:
        meta = {k: json.dumps(v) for k, v in asdict(self).items()}
        meta["max_degree"] = json.dumps(self.max_degree)
        meta["format"] = "tocom-compensator/1"
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "the plugin file") -> PluginSpec:
        """Parse and check every field (type and range) before anything is built from it.

        Raises:
            ValueError: one line naming ``source``, the field and what it holds.
        """
        if meta.get("format") != "tocom-compensator/1":
            raise ValueError(f"{source} is not a tocom compensator file (format={meta.get('format')!r})")
        fields = {}
        for name in cls.__dataclass_fields__:
            if name not in meta:
                continue
            try:
                fields[name] = json.loads(meta[name])
            except (json.JSONDecodeError, RecursionError):
                raise ValueError(f"{source}: metadata field {name!r} is not valid JSON; "
                                 "the file is damaged, re-download or re-train the plugin") from None
        missing = [n for n in ("arch", "embed_dim", "depth", "num_heads", "attn_dim") if n not in fields]
        if missing:
            raise ValueError(f"{source}: metadata lacks {', '.join(missing)}; "
                             "re-download or re-train the plugin")
        for name, value in fields.items():
            problem = _field_problem(name, value)
            if problem:
                raise ValueError(f"{source}: metadata field {name!r} is {short_json(value)}, {problem}; "
                                 "re-download or re-train the plugin")
        return cls(**fields)


# Bounds far above any ViT, so that metadata can never ask for more than its tensors hold.
_INT_FIELDS = {"embed_dim": 1 << 16, "depth": 1024, "num_heads": 1 << 12, "attn_dim": 1 << 16,
               "groups": 1024, "rank": 1024}
_CHOICES = {"variant": VARIANTS, "method": COMPRESSION_METHODS, "mode": MODES}


def _field_problem(name: str, value) -> str | None:
    """Why a metadata value is unacceptable for field ``name`` (None when it is fine)."""
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            return "not an integer"
        if not 1 <= value <= _INT_FIELDS[name]:
            return f"outside 1..{_INT_FIELDS[name]}"
    elif name == "num_prefix":
        integer = isinstance(value, int) and not isinstance(value, bool)
        if value is not None and not (integer and 0 <= value <= 1024):
            return "not null or an integer in 0..1024"
    elif name == "scale":
        if not _is_finite(value):
            return "not a finite number"
    elif name in _CHOICES:
        if value not in _CHOICES[name]:
            return f"not one of {', '.join(_CHOICES[name])}"
    elif name in ("recipe", "adapted"):
        if not isinstance(value, dict):
            return "not a JSON object"
    elif not isinstance(value, str):  # arch, family
        return "not a string"
    return None


def _is_finite(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(value)
    except TypeError:
        return False


class CompensatorBank(nn.Module):
    """ToCom plugin arithmetic. ``A``: (L, 2, K, h, in) down-projections, ``B``: (L, 2, K, out, h) up.

    Index 1 is the projection (q, v); K the stored groups (see :class:`PluginSpec`).
    """

    def __init__(self, spec: PluginSpec):
        super().__init__()
        if spec.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {spec.variant!r}")
        if spec.groups < 1 or spec.rank < 1:
            raise ValueError(f"groups and rank must be >= 1, got {spec.groups}, {spec.rank}")
        self.spec = spec
        k, h = spec.stored_groups, spec.rank
        a = torch.empty(spec.depth, 2, k, h, spec.embed_dim)
        # LoRA-style init: random down-projections, zero up-projections (delta starts at zero).
        nn.init.kaiming_uniform_(a.view(-1, spec.embed_dim), a=math.sqrt(5))
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(spec.depth, 2, k, spec.attn_dim, h))

    # ----- arithmetic ---------------------------------------------------------------------
    def check_degree(self, degree: int) -> None:
        if not 0 <= degree <= self.spec.max_degree:
            raise ValueError(
                f"degree {degree} is outside this plugin's range 0..{self.spec.max_degree}; "
                "train a plugin with more groups (--groups) for larger degrees"
            )

    def coefficients(self, source: int, target: int, scale: float | None = None) -> torch.Tensor:
        """(K,) float64 weight of each stored group in delta(source -> target), on the plugin's device."""
        self.check_degree(source)
        self.check_degree(target)
        s = self.spec.scale if scale is None else scale
        if not _is_finite(s):
            raise ValueError(f"scale must be a finite number, got {s!r}")
        g, lo, hi = self.spec.groups, min(source, target), max(source, target)
        sign = 1.0 if target > source else -1.0
        c = torch.zeros(self.spec.stored_groups, dtype=torch.float64)
        if self.spec.variant == "standard":
            c[lo:hi] = sign * s
        elif self.spec.variant == "shared":
            c[0] = (target - source) * s
        elif target > source:
            c[lo:hi] = s
        else:
            c[g + lo : g + hi] = s
        return c.to(self.A.device)

    def deltas(self, source: int, target: int, scale: float | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(L, 2, attn_dim, embed_dim) weight deltas of W_q and W_v of every block.

        float32 by default (a degree switch must cost less than a forward), float64 for checking
        the arithmetic identities.
        """
        return self.delta_of(self.coefficients(source, target, scale), dtype)

    def delta_of(self, coeff: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(L, 2, attn_dim, embed_dim) dense delta ``B diag(coeff) A`` of every block."""
        b, a = self.factors(coeff, dtype)
        return torch.bmm(b.flatten(0, 1), a.flatten(0, 1)).view(self.spec.depth, 2, self.spec.attn_dim, -1)

    def factors(self, coeff: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``delta = b @ a`` per block and projection: b (L, 2, out, k*h), a (L, 2, k*h, in) with
        the coefficients folded in, over only the k groups whose coefficient is not zero."""
        used = coeff.nonzero().flatten()
        lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
        # Degrees select a run of groups: slice (a view, no copy) unless the run has holes.
        pick = slice(lo, hi) if hi - lo == len(used) else used
        c = coeff[pick].to(self.A.device, dtype).view(-1, 1, 1)
        a = (self.A[:, :, pick].to(dtype) * c).flatten(2, 3)  # (L, 2, k*h, in)
        b = self.B[:, :, pick].to(dtype).permute(0, 1, 3, 2, 4).flatten(3, 4)  # (L, 2, out, k*h)
        return b, a

    def low_rank(self, layer: int, coeff: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Fused masked product for training: x (..., in) -> (..., 2, attn_dim) q and v deltas.

        ``coeff`` (K,) comes from :meth:`coefficients`; groups with coefficient 0 contribute 0.
        Computed in ``x``'s dtype on ``x``'s device, whatever device the coefficients are on.
        """
        k, h = self.spec.stored_groups, self.spec.rank
        a = self.A[layer].reshape(2 * k * h, -1)
        z = x @ a.to(x.dtype).t()  # (..., 2*K*h)
        z = z.view(*x.shape[:-1], 2, k, h) * coeff.to(x.device, x.dtype).view(k, 1)
        return torch.einsum("...pkh,pkoh->...po", z, self.B[layer].to(x.dtype))

    def live(self, coeff: torch.Tensor) -> QVDelta:
        """Per-forward q/v additions ``x -> (dq, dv)`` for coefficients ``coeff`` (K,), with grads
        to the plugin: what ``model.forward_tokens(images, qv_delta=...)`` takes."""
        def qv_delta(layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dq, dv = self.low_rank(layer, coeff, x).unbind(-2)
            return dq, dv
        return qv_delta

    def live_delta(self, source: int, target: int, scale: float | None = None) -> QVDelta:
        """:meth:`live` for delta(source -> target)."""
        return self.live(self.coefficients(source, target, scale))

    def extra_repr(self) -> str:
        s = self.spec
        return (f"arch={s.arch}, depth={s.depth}, dim={s.embed_dim}, groups={s.groups}, rank={s.rank}, "
                f"scale={s.scale}, method={s.method}, variant={s.variant}, mode={s.mode}, family={s.family}")

"""Model-level PEFT operations: add, fold, remove adapters and choose what trains.

Every change is a module replacement inside a block's existing slots (``attn.qkv``, ``norm2``,
``mlp``); no forward method is patched, so stock timm forwards and tocom's token-merging
forwards both pick the adapters up. Supported models: timm ``VisionTransformer`` and
``VisionTransformerDistilled`` (DeiT), i.e. anything whose ``model.blocks[i].attn.qkv`` is the
fused q/k/v ``nn.Linear`` called as a module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from .adaptformer import ParallelAdapterMLP, unwrap_block, wrap_block
from .config import QKV_SLICES, AdaptFormerConfig, LoRAConfig
from .lora import LoRAQKV

SUPPORTED_MODELS = (
    "timm VisionTransformer / VisionTransformerDistilled (DeiT) models, whose "
    "model.blocks[i].attn.qkv is a fused q/k/v nn.Linear"
)
PEFT_METHODS = ("lora", "adaptformer")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a supported model, in order; TypeError for anything else."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} has no model.blocks; tocom.peft supports {SUPPORTED_MODELS}")
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(getattr(attn, "qkv", None), (nn.Linear, LoRAQKV)):
            raise TypeError(f"{type(model).__name__}.blocks[{i}] has no attn.qkv Linear; "
                            f"tocom.peft supports {SUPPORTED_MODELS}")
        if hasattr(attn, "q_bias"):
            # BEiT/EVA-style attention reads qkv.weight directly, which would bypass a LoRA wrapper.
            raise TypeError(f"{type(model).__name__}.blocks[{i}].attn uses separate q/v biases "
                            f"(BEiT/EVA style); tocom.peft supports {SUPPORTED_MODELS}")
    return list(blocks)


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` behind a qkv slot, whether or not it is LoRA-wrapped.

    Editing its ``weight`` in place (e.g. folding a compensator delta into the W_q / W_v rows)
    changes the model's output in both cases, because :class:`LoRAQKV` always calls its base.
    """
    if isinstance(module, LoRAQKV):
        return module.base
    if isinstance(module, nn.Linear):
        return module
    raise TypeError(f"expected an nn.Linear or LoRAQKV qkv projection, got {type(module).__name__}")


def add_lora(model: nn.Module, rank: int = 8, targets: Sequence[str] = QKV_SLICES,
             alpha: float | None = None, dropout: float = 0.0) -> nn.Module:
    """Wrap every block's ``attn.qkv`` in a :class:`LoRAQKV` (in place) and return ``model``.

    Args:
        rank: LoRA rank r > 0.
        targets: non-empty subset of ``("q", "k", "v")`` (each a D-row slice of the fused weight).
        alpha: delta scale is ``alpha / rank``; ``None`` means ``alpha = rank`` (scale 1).
        dropout: dropout on the LoRA branch input.
    Outputs are unchanged right after this call (B starts at zero). Load pre-trained weights
    before adding LoRA: the base weight's state-dict key becomes ``...attn.qkv.base.weight``.
    """
    config = LoRAConfig(rank=rank, targets=targets, alpha=alpha, dropout=dropout)
    blocks = find_blocks(model)
    if any(isinstance(blk.attn.qkv, LoRAQKV) for blk in blocks):
        raise ValueError("model already has LoRA on its qkv projections; call fold(model) or "
                         "remove_lora(model) before adding LoRA again")
    for blk in blocks:
        blk.attn.qkv = LoRAQKV(blk.attn.qkv, config)
    return model


def fold(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta into its base qkv weight and put the plain ``nn.Linear`` back.

    (Named ``fold``, not ``merge``: merging is what token compression does, ``tocom.compress.merge``.)

    Outputs are unchanged up to float rounding and the extra LoRA cost disappears. AdaptFormer
    adapters are nonlinear (ReLU) and cannot be folded: they are left in place untouched.
    Returns ``model`` (modified in place).
    """
    for blk in find_blocks(model):
        if isinstance(blk.attn.qkv, LoRAQKV):
            blk.attn.qkv = blk.attn.qkv.fold()
    return model




def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every LoRA wrapper *without* folding, restoring the original qkv modules."""
    for blk in find_blocks(model):
        if isinstance(blk.attn.qkv, LoRAQKV):
            blk.attn.qkv = blk.attn.qkv.base
    return model


def add_adaptformer(model: nn.Module, bottleneck: int = 32, scale: float = 0.1) -> nn.Module:
    """Add an AdaptFormer adapter in parallel to every block's MLP (in place); return ``model``.

    Each block gets ``norm2 = Identity`` and ``mlp = ParallelAdapterMLP(norm2, mlp, adapter, scale)``
    so the block computes ``x + ls2(MLP(LN(x)) + scale * adapter(x))``: with layer scale the
    adapter output is scaled by ``ls2`` too. Outputs are unchanged right after this call
    (W_up starts at zero). :func:`remove_adaptformer` restores the original modules.
    """
    config = AdaptFormerConfig(bottleneck=bottleneck, scale=scale)
    blocks = find_blocks(model)
    for i, blk in enumerate(blocks):
        if not isinstance(getattr(blk, "norm2", None), nn.Module) or not isinstance(
                getattr(blk, "mlp", None), nn.Module):
            raise TypeError(f"blocks[{i}] has no norm2/mlp modules; tocom.peft supports {SUPPORTED_MODELS}")
        if isinstance(blk.mlp, ParallelAdapterMLP):
            raise ValueError("model already has AdaptFormer adapters; call remove_adaptformer(model) first")
    for blk in blocks:
        # The block input width equals the qkv input width in every supported ViT.
        wrap_block(blk, base_linear(blk.attn.qkv).in_features, config.bottleneck, config.scale)
    return model


def remove_adaptformer(model: nn.Module) -> nn.Module:
    """Remove every AdaptFormer adapter, putting back the very same ``norm2``/``mlp`` objects."""
    for blk in find_blocks(model):
        if isinstance(getattr(blk, "mlp", None), ParallelAdapterMLP):
            unwrap_block(blk)
    return model


def adapter_parameters(model: nn.Module, method: str) -> list[nn.Parameter]:
    """The parameters a PEFT ``method`` ("lora" or "adaptformer") added to ``model``."""
    if method not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; choose from {PEFT_METHODS}")
    params: list[nn.Parameter] = []
    for blk in find_blocks(model):
        if method == "lora" and isinstance(blk.attn.qkv, LoRAQKV):
            params += [blk.attn.qkv.lora_A, blk.attn.qkv.lora_B]
        elif method == "adaptformer" and isinstance(getattr(blk, "mlp", None), ParallelAdapterMLP):
            params += list(blk.mlp.adapter.parameters())
    return params


def mark_trainable(model: nn.Module, method: str | Sequence[str], head: bool = True,
                   extra: Iterable[str] = ()) -> nn.Module:
    """Freeze everything except the adapters of ``method``, the head and ``extra``; return ``model``.

    Args:
        method: "lora", "adaptformer", or a sequence of them (an empty one trains no adapter,
            e.g. for linear probing).
        head: also train ``model.get_classifier()`` (for DeiT distilled: both heads).
        extra: parameter names or ``fnmatch`` patterns (e.g. ``"blocks.*.pyra.*"``) to train too;
            each must match at least one parameter.
    """
    methods = (method,) if isinstance(method, str) else tuple(method)
    chosen: dict[int, nn.Parameter] = {}
    for m in methods:
        params = adapter_parameters(model, m)
        if not params:
            raise ValueError(f"mark_trainable(method={m!r}): model has no {m} adapters; "
                             f"call add_{m}(model) first")
        chosen.update((id(p), p) for p in params)
    if head:
        if not callable(getattr(model, "get_classifier", None)):
            raise TypeError(f"{type(model).__name__} has no get_classifier(); pass head=False "
                            "and name the head's parameters in extra")
        heads = model.get_classifier()  # DeiT distilled returns (head, head_dist)
        for h in heads if isinstance(heads, tuple) else (heads,):
            chosen.update((id(p), p) for p in h.parameters())
    named = list(model.named_parameters())
    for pattern in extra:
        hits = [p for name, p in named if fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(f"extra pattern {pattern!r} matches no parameter of {type(model).__name__}")
        chosen.update((id(p), p) for p in hits)
    model.requires_grad_(False)
    for p in chosen.values():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what an optimizer should receive), in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts; shared parameters are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

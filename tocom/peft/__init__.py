"""Parameter-efficient fine-tuning for timm ViTs: LoRA on the fused qkv and AdaptFormer.

Layout (one job per module): ``config`` (validated settings), ``lora`` / ``adaptformer``
(the layers), ``model`` (adding, folding, removing adapters and choosing what trains).
"""

from .adaptformer import BottleneckAdapter, ParallelAdapterMLP
from .config import AdaptFormerConfig, LoRAConfig
from .lora import LoRAQKV
from .model import (
    PEFT_METHODS,
    adapter_parameters,
    add_adaptformer,
    add_lora,
    base_linear,
    count_parameters,
    find_blocks,
    fold,
    mark_trainable,
    remove_adaptformer,
    remove_lora,
    trainable_parameters,
)

__all__ = [
    "PEFT_METHODS",
    "AdaptFormerConfig",
    "BottleneckAdapter",
    "LoRAConfig",
    "LoRAQKV",
    "ParallelAdapterMLP",
    "adapter_parameters",
    "add_adaptformer",
    "add_lora",
    "base_linear",
    "count_parameters",
    "find_blocks",
    "fold",
    "mark_trainable",
    "remove_adaptformer",
    "remove_lora",
    "trainable_parameters",
]

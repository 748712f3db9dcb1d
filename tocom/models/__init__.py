"""Layer 2: backbone adapters that route block forwards through layer 1."""

from tocom.models.blocks import CompressionConfig, TokenState
from tocom.models.vit import SUPPORTED, dims_of, is_patched, patch, schedule_report, unpatch

__all__ = [
    "SUPPORTED", "CompressionConfig", "TokenState", "dims_of", "is_patched", "patch", "schedule_report",
    "unpatch",
]

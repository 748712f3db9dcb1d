"""Layer 2: backbone adapters that route block forwards through layer 1."""

from tocom.models.blocks import COMPRESSION_METHODS, CompressionConfig, QVDelta, TokenState
from tocom.models.lock import StateLock
from tocom.models.vit import (
    SUPPORTED,
    PluginHooks,
    dims_of,
    is_patched,
    patch,
    plugin_hooks,
    schedule_report,
    set_plugin_hooks,
    state_lock,
    unpatch,
)

__all__ = [
    "COMPRESSION_METHODS", "SUPPORTED", "CompressionConfig", "PluginHooks", "QVDelta", "StateLock",
    "TokenState", "dims_of", "is_patched", "patch", "plugin_hooks", "schedule_report", "set_plugin_hooks",
    "state_lock", "unpatch",
]

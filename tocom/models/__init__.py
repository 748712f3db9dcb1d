"""Floor 2: backbone adapters that route block forwards through floor 1.

One adapter per family (:mod:`tocom.models.adapter` states the contract); :mod:`tocom.models.registry`
dispatches ``patch``, ``unpatch``, ``dims_of`` and ``schedule_report`` to the right one.
"""

from tocom.models.adapter import Adapter, Projection, QVProjections
from tocom.models.blocks import COMPRESSION_METHODS, CompressionConfig, QVDelta, TokenState
from tocom.models.fingerprint import weights_fingerprint
from tocom.models.lock import StateLock
from tocom.models.registry import (
    adapter_for,
    dims_of,
    family_of,
    is_patched,
    patch,
    require_feature,
    schedule_report,
    supported_families,
    unpatch,
)
from tocom.models.state import PluginHooks, plugin_hooks, set_plugin_hooks, state_lock
from tocom.models.vit import SUPPORTED

__all__ = [
    "COMPRESSION_METHODS", "SUPPORTED", "Adapter", "CompressionConfig", "PluginHooks", "Projection",
    "QVDelta", "QVProjections", "StateLock", "TokenState", "adapter_for", "dims_of", "family_of",
    "is_patched", "patch", "plugin_hooks", "require_feature", "schedule_report", "set_plugin_hooks",
    "state_lock", "supported_families", "unpatch", "weights_fingerprint",
]

"""Layer 4: Token Compensator plugins, their arithmetic, files and training objective."""

from tocom.compensator.attach import attach, attachment, detach, set_degree
from tocom.compensator.fit import check_fits, spec_for
from tocom.compensator.live import install_live, remove_live, set_pair
from tocom.compensator.objective import DistillObjective, sample_pair
from tocom.compensator.plugin import VARIANTS, Compensator, PluginSpec

__all__ = [
    "VARIANTS", "Compensator", "DistillObjective", "PluginSpec", "attach", "attachment", "check_fits",
    "detach", "install_live", "remove_live", "sample_pair", "set_degree", "set_pair", "spec_for",
]

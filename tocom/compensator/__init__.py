"""Floor 4: Token Compensator plugins, their arithmetic, files and training objective."""

from tocom.compensator.attach import attach, attachment, detach, is_attached, restoring, set_degree
from tocom.compensator.bank import CompensatorBank
from tocom.compensator.fit import check_fits, spec_for
from tocom.compensator.objective import DistillObjective, sample_pair
from tocom.compensator.plugin import VARIANTS, Compensator, PluginSpec

__all__ = [
    "VARIANTS", "Compensator", "CompensatorBank", "DistillObjective", "PluginSpec", "attach", "attachment",
    "check_fits", "detach", "is_attached", "restoring", "sample_pair", "set_degree", "spec_for",
]

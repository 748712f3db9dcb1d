"""tocom: elastic Vision Transformers.

Token compression (ToMe merging, EViT pruning) for any timm ViT, Token Compensator plugins that
let a model fine-tuned at one compression degree run at another, and PYRA token modulation.
"""

from tocom.compensator import Compensator, attach, detach, set_degree
from tocom.compress import resolve_schedule, schedule_from_flops, unmerge
from tocom.jobs.adapt import adapt
from tocom.models import dims_of, patch, schedule_report, unpatch
from tocom.runtime import compile
from tocom.serve.calibrate import degree_for_latency

__version__ = "0.1.0"
__all__ = [
    "Compensator", "adapt", "attach", "compile", "degree_for_latency", "detach", "dims_of", "patch",
    "resolve_schedule", "schedule_from_flops", "schedule_report", "set_degree", "unmerge", "unpatch",
]

"""Floor 1: token reduction as pure tensor functions (no modules, no global state)."""

from tocom.compress.dense import dense_clamp, dense_model_flops, dense_unmerge, merged_owner
from tocom.compress.evit import PrunePlan, prune, prune_plan, prune_source
from tocom.compress.flops import ViTDims, gflops, model_flops, schedule_from_flops
from tocom.compress.named import NAMED_SCHEDULES, named_schedule
from tocom.compress.parse import parse_schedule
from tocom.compress.schedule import (
    Schedule,
    check_unclamped,
    clamp_schedule,
    ratio_schedule,
    resolve_schedule,
    tokens_per_layer,
)
from tocom.compress.tome import (
    MergePlan,
    Modulator,
    bipartite_matching,
    merge,
    merge_pairs,
    merge_source,
    merge_wavg,
    modulate_sources,
)
from tocom.compress.unmerge import initial_source, token_assignment, unmerge

__all__ = [
    "NAMED_SCHEDULES", "MergePlan", "Modulator", "PrunePlan", "Schedule", "ViTDims", "bipartite_matching",
    "check_unclamped", "clamp_schedule", "dense_clamp", "dense_model_flops", "dense_unmerge", "gflops",
    "initial_source", "merge", "merge_pairs", "merge_source", "merge_wavg", "merged_owner", "model_flops",
    "modulate_sources", "named_schedule", "parse_schedule", "prune", "prune_plan", "prune_source",
    "ratio_schedule", "resolve_schedule", "schedule_from_flops", "token_assignment", "tokens_per_layer",
    "unmerge",
]

"""Floor 1: token reduction as pure tensor functions (no modules, no global state)."""

from tocom.compress.dense import dense_clamp, dense_model_flops, dense_unmerge, merged_owner
from tocom.compress.evit import PrunePlan, prune, prune_plan, prune_source
from tocom.compress.flops import ViTDims, gflops, model_flops, schedule_from_flops
from tocom.compress.named import NAMED_SCHEDULES, named_schedule
from tocom.compress.parse import parse_schedule
from tocom.compress.pitome import (
    PitomePlan,
    energy_score,
    pitome_block_plan,
    pitome_margin,
    pitome_matching,
    pitome_merge,
    pitome_source,
    pitome_wavg,
)
from tocom.compress.schedule import (
    Schedule,
    check_unclamped,
    clamp_schedule,
    ratio_schedule,
    resolve_schedule,
    tokens_per_layer,
)
from tocom.compress.tofu import merge_mlerp, tofu_merges, tofu_prune, tofu_reduce
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
    "NAMED_SCHEDULES", "MergePlan", "Modulator", "PitomePlan", "PrunePlan", "Schedule", "ViTDims",
    "bipartite_matching", "check_unclamped", "clamp_schedule", "dense_clamp", "dense_model_flops",
    "dense_unmerge", "energy_score", "gflops", "initial_source", "merge", "merge_mlerp", "merge_pairs",
    "merge_source", "merge_wavg", "merged_owner", "model_flops", "modulate_sources", "named_schedule",
    "parse_schedule", "pitome_block_plan", "pitome_margin", "pitome_matching", "pitome_merge",
    "pitome_source", "pitome_wavg",
    "prune", "prune_plan", "prune_source", "ratio_schedule", "resolve_schedule", "schedule_from_flops",
    "tofu_merges", "tofu_prune", "tofu_reduce", "token_assignment", "tokens_per_layer", "unmerge",
]

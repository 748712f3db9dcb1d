"""Named per-block schedules: PYRA's ``low`` and ``high`` compression rates.

Source: the official PYRA code (Xiong et al., ECCV 2024; github.com/THU-MIG/PYRA,
``model/tome.py::get_merging_schedule``), which lists one schedule per backbone and rate; they
are the per-layer lists of the paper's supplementary material. Kept here as data, keyed by depth,
so that ``parse_schedule("high", dims)`` resolves them without floor 1 knowing about PYRA.

* depth 12 (ViT-B/16 at 224 px, 197 tokens): ``low`` removes 186 tokens, analytic FLOPs ratio
  0.50 (exactly ``schedule_from_flops(dims, 0.5)``); ``high`` removes 192, FLOPs ratio 0.29.
* depth 24 (ViT-L/16 at 224 px): ``low`` FLOPs ratio 0.50, ``high`` 0.29.

The official code gives DeiT-B (distilled) the same ``high`` but a milder ``low``
(``[16] * 6 + [10] * 6``, FLOPs ratio 0.54); pass that list explicitly to reproduce it. Depths
with no published list are an error that names the equivalent ``flops=`` ratios.
"""

from __future__ import annotations

NAMED_SCHEDULES: dict[str, dict[int, tuple[int, ...]]] = {
    "low": {
        12: (16,) * 11 + (10,),
        24: (8,) * 23 + (6,),
    },
    "high": {
        12: (40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3),
        24: (20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1),
    },
}
# The analytic FLOPs ratio each name stands for (ViT-B/16 and ViT-L/16 agree to 0.01).
NAMED_FLOPS_RATIOS = {"low": 0.5, "high": 0.29}


def named_schedule(name: str, depth: int) -> list[int]:
    """PYRA's per-block ``low`` / ``high`` schedule for a ``depth``-block ViT.

    Raises:
        KeyError: an unknown name.
        ValueError: no published schedule for this depth (the message gives the ``flops=`` form).
    """
    if name not in NAMED_SCHEDULES:
        raise KeyError(f"unknown named schedule {name!r}; choose one of {sorted(NAMED_SCHEDULES)}")
    by_depth = NAMED_SCHEDULES[name]
    if depth not in by_depth:
        raise ValueError(
            f"PYRA publishes a {name!r} schedule for depths {sorted(by_depth)} (ViT-B/16, ViT-L/16), not "
            f"for {depth} blocks; use --r flops={NAMED_FLOPS_RATIOS[name]} for the same FLOPs ratio"
        )
    return list(by_depth[depth])

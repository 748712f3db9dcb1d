"""Per-layer reduction schedules.

A schedule says how many tokens each block removes (its degree ``r``). Users give it as

* an ``int``: the same r in every block;
* a ``list`` of ints, one per block (a shorter list is padded with zeros);
* a ``tuple`` ``(r, inflection)`` with an inflection (int or float) in [-1, 1]: a linear ramp
  whose mean is r, decreasing for inflection < 0 and increasing for inflection > 0 (ToMe's
  convention, which reads every tuple this way);

and :func:`schedule_from_flops` derives one from a target FLOPs ratio (PYRA, supplementary Eq. 1).
The effective schedule additionally respects that one block removes at most
``(tokens - protected) // 2`` tokens (see :func:`clamp_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Schedule = int | list[int] | tuple[int, float]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _inflection_pair(r: tuple) -> tuple[int, float]:
    """Read a tuple, which is always ``(r, inflection)``: the container decides, not the elements."""
    if len(r) != 2 or not _is_int(r[0]) or not isinstance(r[1], (int, float)) or isinstance(r[1], bool):
        raise TypeError(
            f"a tuple schedule is (r: int, inflection: float), got {r!r}; write a per-block schedule as a "
            f"list, e.g. {list(r)!r}"
        )
    return r[0], float(r[1])


def resolve_schedule(r: Schedule, depth: int) -> list[int]:
    """Expand a user schedule into one non-negative int per block.

    Args:
        r: an int, a list of ints (padded with zeros to ``depth``), or a tuple ``(r, inflection)``.
        depth: number of blocks.

    Returns:
        list of ``depth`` ints.

    Raises:
        ValueError: negative degrees, a list longer than ``depth``, an inflection outside [-1, 1].
        TypeError: anything that is not one of the forms above (e.g. a tuple of three ints).
    """
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}")
    if isinstance(r, bool):
        raise TypeError("a schedule is an int, a list of ints or (r, inflection); got a bool")
    if isinstance(r, int):
        if r < 0:
            raise ValueError(f"r must be >= 0 (tokens removed per block), got {r}")
        return [r] * depth
    if isinstance(r, tuple):
        mean, inflection = _inflection_pair(r)
        if mean < 0:
            raise ValueError(f"r must be >= 0 (tokens removed per block), got {mean}")
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"inflection must lie in [-1, 1], got {inflection}")
        if depth == 1:
            return [mean]
        # ToMe's ramp: starts at r*(1-inflection), ends at r*(1+inflection), truncated to ints.
        first = int(mean * (1.0 - inflection))
        last = 2 * mean - first
        step = (last - first) / (depth - 1)
        return [int(first + step * i) for i in range(depth)]
    if isinstance(r, list):
        values = list(r)
        if not all(_is_int(v) for v in values):
            raise TypeError(f"a per-block schedule must hold ints, got {values!r}")
        if len(values) > depth:
            raise ValueError(f"schedule has {len(values)} entries but the model has {depth} blocks")
        if any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0 in every block, got {values}")
        return values + [0] * (depth - len(values))
    raise TypeError(
        f"a schedule is an int, a list of ints or a tuple (r: int, inflection: float); got {type(r).__name__}"
    )


def clamp_schedule(schedule: Sequence[int], num_tokens: int, num_prefix: int) -> list[int]:
    """The schedule actually applied: each block removes at most ``(tokens - num_prefix) // 2``.

    Args:
        schedule: per-block r as given by :func:`resolve_schedule`.
        num_tokens: sequence length entering the first block (prefix tokens included).
        num_prefix: protected tokens (class, distillation, registers).

    Returns:
        per-block r after clamping.
    """
    effective = []
    tokens = num_tokens
    for r in schedule:
        r = min(r, max(tokens - num_prefix, 0) // 2)
        effective.append(r)
        tokens -= r
    return effective


def check_unclamped(schedule: Sequence[int], num_tokens: int, num_prefix: int) -> list[int]:
    """Return ``schedule`` if no block would be clamped, else raise naming the first such block.

    Methods that train per-block parameters for a fixed r (PYRA) or fine-tune at a fixed schedule
    need every block to remove exactly the r it was given.
    """
    effective = clamp_schedule(schedule, num_tokens, num_prefix)
    tokens = num_tokens
    for i, (asked, got) in enumerate(zip(schedule, effective)):
        if asked != got:
            raise ValueError(
                f"schedule {list(schedule)} would be clamped at block {i}: it asks for r={asked} but only "
                f"{got} of its {tokens} tokens can merge ((tokens - {num_prefix} protected) // 2); "
                "lower r there or use a milder schedule (e.g. flops=RATIO)"
            )
        tokens -= got
    return list(schedule)


def tokens_per_layer(schedule: Sequence[int], num_tokens: int, num_prefix: int) -> list[int]:
    """Sequence length after each block for an (unclamped) schedule; clamping is applied."""
    tokens, out = num_tokens, []
    for r in clamp_schedule(schedule, num_tokens, num_prefix):
        tokens -= r
        out.append(tokens)
    return out


def ratio_schedule(flops_ratio: float, depth: int, num_patches: int, tokens_left: int) -> list[int]:
    """PYRA supplementary Eq. 1 for a given number of tokens left after the last block.

    ``r_l = floor((g(l-1) - g(l)) * (T - t))`` with ``g(x) = (1 - x/L)^(F/f - 1)``, where
    ``F/f = 1 / flops_ratio``, ``T = num_patches`` and ``t = tokens_left``.
    """
    if not 0.0 < flops_ratio <= 1.0:
        raise ValueError(f"the FLOPs ratio f/F must lie in (0, 1], got {flops_ratio}")
    if not 0 <= tokens_left <= num_patches:
        raise ValueError(f"tokens_left must lie in [0, {num_patches}], got {tokens_left}")
    exponent = 1.0 / flops_ratio - 1.0

    def g(x: float) -> float:
        return (1.0 - x / depth) ** exponent

    span = num_patches - tokens_left
    return [math.floor((g(layer - 1) - g(layer)) * span) for layer in range(1, depth + 1)]

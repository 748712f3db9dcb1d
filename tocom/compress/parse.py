"""Schedules written as text, as the command line takes them."""

from __future__ import annotations

from tocom.compress.flops import ViTDims, schedule_from_flops
from tocom.compress.named import NAMED_SCHEDULES, named_schedule
from tocom.compress.schedule import Schedule, resolve_schedule


def parse_schedule(text: str, dims: ViTDims | None = None) -> Schedule:
    """Parse ``"8"``, ``"8,8,4,0"`` (per block), ``"8:-1"`` ((r, inflection)), ``"flops=0.5"``,
    or PYRA's named ``"low"`` / ``"high"``.

    ``flops=`` and the names need ``dims`` and yield a per-block list (PYRA supplementary Eq. 1;
    :mod:`tocom.compress.named`).
    """
    text = text.strip()
    if text in NAMED_SCHEDULES:
        if dims is None:
            raise ValueError(f"the named schedule {text!r} needs the model's dimensions (its depth)")
        return named_schedule(text, dims.depth)
    try:
        if text.startswith("flops="):
            if dims is None:
                raise ValueError("a flops= schedule needs the model's dimensions")
            return schedule_from_flops(dims, float(text[len("flops="):]))
        if ":" in text:
            r, inflection = text.split(":")
            schedule: Schedule = (int(r), float(inflection))
        elif "," in text:
            schedule = [int(v) for v in text.split(",") if v.strip()]
        else:
            schedule = int(text)
    except ValueError as err:
        raise ValueError(
            f"cannot read schedule {text!r} ({err}); write an int (8), a per-block list (8,8,4), "
            "r:inflection (8:-1), flops=RATIO (flops=0.5) or low / high (PYRA)"
        ) from None
    if dims is not None:
        resolve_schedule(schedule, dims.depth)
    return schedule

"""Schedules written as text, as the command line takes them."""

from __future__ import annotations

from tocom.compress.flops import ViTDims, schedule_from_flops
from tocom.compress.schedule import Schedule, resolve_schedule


def parse_schedule(text: str, dims: ViTDims | None = None) -> Schedule:
    """Parse ``"8"``, ``"8,8,4,0"`` (per block), ``"8:-1"`` ((r, inflection)) or ``"flops=0.5"``.

    ``flops=`` needs ``dims`` and yields a per-block list (PYRA supplementary Eq. 1).
    """
    text = text.strip()
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
            "r:inflection (8:-1) or flops=RATIO (flops=0.5)"
        ) from None
    if dims is not None:
        resolve_schedule(schedule, dims.depth)
    return schedule

"""Where the optional shared weights and data live (real DeiT-Tiny, ImageNet sample, VTAB-1k CIFAR-10)."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TOCOM_SHARED"


def shared_dir(explicit: str | Path | None = None) -> Path | None:
    """``explicit`` if given, else ``$TOCOM_SHARED``, else None: the library never guesses a folder
    from the current directory.

    The folder may be absent even when named: callers that need it check for the files they use
    and say so.
    """
    chosen = explicit if explicit is not None else os.environ.get(ENV) or None
    return Path(chosen).expanduser().resolve() if chosen is not None else None

"""Where the optional shared weights and data live (real DeiT-Tiny, ImageNet sample, VTAB-1k CIFAR-10)."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    """``$TOCOM_SHARED``, else ``../shared`` beside the current directory (the repo layout).

    The folder may be absent: callers that need it check for the files they use and say so.
    """
    return Path(os.environ.get("TOCOM_SHARED", Path.cwd().parent / "shared")).resolve()

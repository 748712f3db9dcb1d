"""What every stage of the evidence run shares: the backbone, content keys, record files, device."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tocom.atomic import atomic_write
from tocom.data import shared_dir

MODEL = "deit_tiny_patch16_224"


def digest(*parts: object) -> str:
    """12 hex digits of the SHA-256 of ``parts`` as JSON: a unit's content key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def shared_weights(shared: str | Path | None, who: str) -> tuple[Path, Path]:
    """The shared folder (``shared``, else ``$TOCOM_SHARED``) and the real DeiT-Tiny weights in it,
    or a one-line FileNotFoundError; ``who`` is its subject with the verb ("the evidence run needs")."""
    folder = shared_dir(shared)
    if folder is None:
        raise FileNotFoundError(f"{who} the real DeiT-Tiny weights and data: pass --shared DIR "
                                "(laid out as ../shared) or set TOCOM_SHARED")
    weights = folder / "weights" / f"{MODEL}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{who} the real DeiT-Tiny weights; {weights} is missing (pass "
                                "--shared DIR or set TOCOM_SHARED)")
    return folder, weights


def write_json(path: Path, obj: object) -> None:
    """Write a unit's record atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

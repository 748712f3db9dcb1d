"""What every stage of the evidence run shares: the backbone, content keys, record files, device."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tocom.atomic import atomic_write

MODEL = "deit_tiny_patch16_224"


def digest(*parts: object) -> str:
    """12 hex digits of the SHA-256 of ``parts`` as JSON: a unit's content key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path: Path, obj: object) -> None:
    """Write a unit's record atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

"""Delta checkpoints: a fine-tuned model stored as the tensors that differ from its starting point.

AdaptFormer and PYRA train a few adapters and a head on a frozen backbone, yet a full checkpoint
repeats the backbone (22 MB for DeiT-Tiny, against about 0.5 MB of adapters and head). A delta
file keeps only the tensors that differ from a *base* checkpoint, and records the base's file
name and SHA-256 in its metadata:

    delta_base         path of the base when the delta was written
    delta_base_sha256  the base's content hash, checked on every load
    delta_keys         JSON list of every key of the full state dict
    delta_sources      JSON {key: base key} for tensors the base holds under another name
                       (AdaptFormer moves ``norm2`` to ``mlp.norm`` and ``mlp.fc1`` to ``mlp.mlp.fc1``)

:func:`tocom.models.loading.read_state_dict` rebuilds the full state dict transparently, so every
command that takes a checkpoint takes a delta. The base is looked for at its recorded path, then
under its file name next to the delta, then, when ``$TOCOM_SHARED`` is set, in that folder's
``weights/``; a base whose content differs is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
BASE, BASE_SHA, KEYS, SOURCES = "delta_base", "delta_base_sha256", "delta_keys", "delta_sources"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_delta(meta: dict[str, str]) -> bool:
    return BASE_SHA in meta


def differs(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is None or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)


def base_source(key: str, value: torch.Tensor, base_state: dict[str, torch.Tensor], renamed: set[str]
                ) -> str | None:
    """The base key holding exactly ``value``: ``key`` itself, else one of ``renamed`` (base keys
    the checkpoint lacks) with equal content, else any with equal content."""
    if not differs(value, base_state.get(key)):
        return key
    for keys in (renamed, base_state):
        match = next((k for k in keys if not differs(value, base_state[k])), None)
        if match is not None:
            return match
    return None


def strip_delta_metadata(meta: dict[str, str]) -> dict[str, str]:
    """``meta`` without the delta fields (a rebuilt state dict is whole, not a delta)."""
    return {k: v for k, v in meta.items() if k not in (BASE, BASE_SHA, KEYS, SOURCES)}


def delta_tensors(state: dict[str, torch.Tensor], meta: dict[str, str], base_state: dict[str, torch.Tensor],
                  base: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a delta of ``state`` (metadata ``meta``) against ``base_state``,
    the whole state dict of the file ``base``: only tensors the base does not hold, under any name."""
    lacking = set(base_state) - set(state)
    sources = {k: base_source(k, v, base_state, lacking) for k, v in state.items()}
    kept = {k: v.contiguous().clone() for k, v in state.items() if sources[k] is None}
    renamed = {k: src for k, src in sources.items() if src is not None and src != k}
    meta = strip_delta_metadata(meta)
    meta.update({BASE: str(base.resolve()), BASE_SHA: sha256_file(base),
                 KEYS: json.dumps(sorted(state)), SOURCES: json.dumps(renamed)})
    return kept, meta


def find_base(path: str | Path, meta: dict[str, str]) -> Path:
    """The base file of the delta at ``path``: its recorded path, else its name beside the delta,
    else, when ``$TOCOM_SHARED`` is set, its name under that folder's ``weights/``."""
    from tocom.data import shared_dir

    recorded = Path(meta[BASE])
    candidates = [recorded, Path(path).parent / recorded.name]
    shared = shared_dir()
    if shared is not None:
        candidates.append(shared / "weights" / recorded.name)
    for candidate in candidates:
        if candidate.is_file() and sha256_file(candidate) == meta[BASE_SHA]:
            logger.info("%s: loading its base %s", path, candidate)
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"{path} stores only what differs from {recorded.name} (sha256 {meta[BASE_SHA][:16]}...), and no "
        f"file with that content was found (tried {tried}); put that base checkpoint next to the delta")


def apply_delta(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, str],
                base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state dict of the delta at ``path`` (its tensors ``state``, metadata ``meta``), given
    the whole state dict of its base (the file :func:`find_base` finds)."""
    try:
        keys, sources = json.loads(meta[KEYS]), json.loads(meta.get(SOURCES, "{}"))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: its delta metadata is incomplete or corrupt ({err!r}); write it again "
                         "with tocom delta") from None
    missing = [k for k in keys if k not in state and sources.get(k, k) not in base_state]
    if missing:
        raise ValueError(f"{path}: tensors {missing[:5]} are in neither the delta nor its base")
    used: set[str] = set()
    full = {}
    for k in keys:
        if k in state:
            full[k] = state[k]
            continue
        src = sources.get(k, k)
        # several keys may share one base tensor (equal content): each gets its own storage
        full[k] = base_state[src].clone() if src in used else base_state[src]
        used.add(src)
    return full

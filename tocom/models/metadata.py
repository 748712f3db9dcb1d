"""Checking a checkpoint's string metadata before anything is built from it.

A checkpoint's metadata is input like any other: it decides which timm model is built, and so how
much memory is allocated and which files timm opens. Only keys that shape the network are passed
on, each of a checked type and within bounds far above any ViT; keys that make timm read files or
reach the hub are refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# timm ViT-family constructor arguments that shape the network, with (type, upper bound).
_INT, _FLOAT, _BOOL, _STR = int, float, bool, str
MODEL_KWARGS: dict[str, tuple[type, float | None]] = {
    "img_size": (_INT, 4096), "patch_size": (_INT, 1024), "in_chans": (_INT, 64),
    "num_classes": (_INT, 1 << 20), "embed_dim": (_INT, 1 << 14), "depth": (_INT, 256),
    "num_heads": (_INT, 1024), "mlp_ratio": (_FLOAT, 64), "qkv_bias": (_BOOL, None),
    "qk_norm": (_BOOL, None), "init_values": (_FLOAT, 1e3), "class_token": (_BOOL, None),
    "no_embed_class": (_BOOL, None), "reg_tokens": (_INT, 64), "pre_norm": (_BOOL, None),
    "fc_norm": (_BOOL, None), "global_pool": (_STR, None), "dynamic_img_size": (_BOOL, None),
    "dynamic_img_pad": (_BOOL, None), "drop_rate": (_FLOAT, 1), "pos_drop_rate": (_FLOAT, 1),
    "patch_drop_rate": (_FLOAT, 1), "proj_drop_rate": (_FLOAT, 1), "attn_drop_rate": (_FLOAT, 1),
    "drop_path_rate": (_FLOAT, 1), "use_abs_pos_emb": (_BOOL, None), "use_rel_pos_bias": (_BOOL, None),
    "use_shared_rel_pos_bias": (_BOOL, None), "swiglu_mlp": (_BOOL, None), "scale_mlp": (_BOOL, None),
    "use_rot_pos_emb": (_BOOL, None), "ref_feat_shape": (_INT, 1024),
}
# What the refusal names, because these are the keys a crafted file would use.
_OUTSIDE = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def json_field(meta: dict[str, str], key: str, default: Any, kind: type | tuple[type, ...],
               source: str | Path) -> Any:
    """``json.loads(meta[key])`` checked to be of ``kind`` (``default`` when absent).

    Raises:
        ValueError: one line naming ``source`` and ``key`` when the value is not JSON or not ``kind``.
    """
    if key not in meta:
        return default
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError, TypeError):
        raise ValueError(f"{source}: metadata field {key!r} is not valid JSON; the checkpoint is damaged, "
                         "re-export it") from None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{source}: metadata field {key!r} should be {names}, got {short_json(value)}; "
                         "re-export the checkpoint")
    return value


def model_kwargs(meta: dict[str, str], source: str | Path) -> dict[str, Any]:
    """The checkpoint's ``model_kwargs`` for ``timm.create_model``, each key known and in bounds.

    Raises:
        ValueError: naming ``source`` and the first key that is unknown, of the wrong type or out of
            bounds.
    """
    kwargs = json_field(meta, "model_kwargs", {}, dict, source)
    for key, value in kwargs.items():
        if key not in MODEL_KWARGS:
            why = "makes timm read files or the hub" if key in _OUTSIDE or key.startswith("pretrained") \
                else "is not a network shape this tocom passes to timm"
            raise ValueError(f"{source}: model_kwargs key {key!r} {why}; refusing the checkpoint "
                             "(re-export it with tocom, or remove the key)")
        problem = _value_problem(value, *MODEL_KWARGS[key])
        if problem:
            raise ValueError(f"{source}: model_kwargs {key}={short_json(value)} is {problem}; re-export the "
                             "checkpoint")
    return kwargs


def _value_problem(value: Any, kind: type, bound: float | None) -> str | None:
    if kind is _BOOL:
        return None if isinstance(value, bool) else "not true or false"
    if kind is _STR:
        return None if isinstance(value, str) and len(value) <= 64 else "not a short string"
    if kind is _INT and isinstance(value, list) and len(value) == 2:  # (height, width) sizes
        problems = [_value_problem(v, kind, bound) for v in value]
        return next((p for p in problems if p), None)
    numeric = (int,) if kind is _INT else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        return "not an integer" if kind is _INT else "not a number"
    if not math.isfinite(value) or not 0 <= value <= bound:
        return f"outside 0..{bound:g}"
    return None


def short_json(value: Any) -> str:
    """``value`` as JSON, cut to 40 characters for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."

"""The 19 VTAB-1k tasks, their groups, and tolerant matching of task folder names."""

from __future__ import annotations

import re
from pathlib import Path

NATURAL, SPECIALIZED, STRUCTURED = "Natural", "Specialized", "Structured"

TASK_GROUPS: dict[str, str] = {
    # Natural
    "caltech101": NATURAL,
    "cifar": NATURAL,  # CIFAR-100 (VTAB's "cifar" is always the 100-class set)
    "dtd": NATURAL,
    "oxford_flowers102": NATURAL,
    "oxford_iiit_pet": NATURAL,
    "svhn": NATURAL,
    "sun397": NATURAL,
    # Specialized
    "patch_camelyon": SPECIALIZED,
    "eurosat": SPECIALIZED,
    "resisc45": SPECIALIZED,
    "diabetic_retinopathy": SPECIALIZED,
    # Structured
    "clevr_count": STRUCTURED,
    "clevr_dist": STRUCTURED,
    "dmlab": STRUCTURED,
    "kitti": STRUCTURED,
    "dsprites_loc": STRUCTURED,
    "dsprites_ori": STRUCTURED,
    "smallnorb_azi": STRUCTURED,
    "smallnorb_ele": STRUCTURED,
}
"""Canonical VTAB-1k task name (community folder name) -> group, in the paper tables' order."""

# Other spellings seen in folder names, TFDS names and paper tables, keyed after _key().
_ALIASES: dict[str, str] = {
    "caltech": "caltech101",
    "cifar100": "cifar",
    "flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "oxfordflowers": "oxford_flowers102",
    "pet": "oxford_iiit_pet",
    "pets": "oxford_iiit_pet",
    "oxfordpet": "oxford_iiit_pet",
    "oxfordpets": "oxford_iiit_pet",
    "oxfordiiitpets": "oxford_iiit_pet",
    "svhncropped": "svhn",
    "sun": "sun397",
    "camelyon": "patch_camelyon",
    "pcam": "patch_camelyon",
    "patchcamelyon": "patch_camelyon",
    "resisc": "resisc45",
    "retinopathy": "diabetic_retinopathy",
    "diabeticretinopathybtgraham": "diabetic_retinopathy",
    "clevrcountall": "clevr_count",
    "clevrdistance": "clevr_dist",
    "clevrclosestobjectdistance": "clevr_dist",
    "kittidist": "kitti",
    "kittidistance": "kitti",
    "kitticlosestvehicledistance": "kitti",
    "dsprloc": "dsprites_loc",
    "dspritesloc": "dsprites_loc",
    "dspriteslocation": "dsprites_loc",
    "dspriteslabelxposition": "dsprites_loc",
    "dsprori": "dsprites_ori",
    "dspritesorientation": "dsprites_ori",
    "dspriteslabelorientation": "dsprites_ori",
    "snorbazim": "smallnorb_azi",
    "smallnorbazimuth": "smallnorb_azi",
    "smallnorblabelazimuth": "smallnorb_azi",
    "snorbelev": "smallnorb_ele",
    "smallnorbelevation": "smallnorb_ele",
    "smallnorblabelelevation": "smallnorb_ele",
}


def _key(name: str) -> str:
    # Case, separators and a "vtab" prefix vary between distributions; letters and digits do not.
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return key[4:] if key.startswith("vtab") and len(key) > 4 else key


_LOOKUP: dict[str, str] = {_key(t): t for t in TASK_GROUPS} | _ALIASES


def canonical_task(name: str | Path) -> str:
    """The canonical VTAB-1k task name for a folder name or path (``"vtab-1k/CIFAR-100"`` -> ``"cifar"``).

    Raises:
        ValueError: not a VTAB-1k task (note ``cifar10`` is not one: VTAB uses CIFAR-100).
    """
    base = Path(str(name).rstrip("/\\")).name
    task = _LOOKUP.get(_key(base))
    if task is None:
        raise ValueError(f"{base!r} is not a VTAB-1k task name; known tasks: {', '.join(TASK_GROUPS)}")
    return task


def task_group(name: str | Path) -> str:
    """``"Natural"``, ``"Specialized"`` or ``"Structured"`` for a VTAB-1k task folder name or path."""
    return TASK_GROUPS[canonical_task(name)]

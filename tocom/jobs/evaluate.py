"""Evaluation sweeps: top-1 accuracy and throughput at many degrees, with and without a plugin.

Images are decoded once: every batch is run through every configuration before the next batch
is loaded. A configuration is a target degree and a plugin scale (None: no plugin).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tocom.compensator import attach, attachment, is_attached, restoring, set_degree
from tocom.compress import Schedule
from tocom.report.bench import sync_device


@dataclass
class EvalRow:
    """One line of ``tocom eval`` output (also its JSON schema)."""

    target: int | list[int]  # a degree, or a per-block schedule (no plugin)
    source: int
    plugin: bool
    scale: float | None
    accuracy: float  # top-1 in [0, 1]
    throughput: float  # images/s of the forward passes alone
    split: str = "test"
    # Per image, in loader order (sweep(..., keep_predictions=True)); not part of the JSON line.
    predictions: list[int] | None = field(default=None, repr=False)
    labels: list[int] | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        row = asdict(self)
        del row["predictions"], row["labels"]
        return row


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A plain, ordered evaluation loader.

    No workers by default: on a small CPU, workers decoding the next batch steal cores from the
    timed forwards and made identical configurations differ by up to 8% in images/s (within 1%
    without them); decoding a batch is cheap next to a dozen forwards of it.
    """
    # Workers persist across passes: validation every epoch would otherwise respawn them each time.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


@torch.inference_mode()
def sweep(model: nn.Module, loader: DataLoader, targets: Sequence[Schedule], source: int,
          plugin: nn.Module | None = None, scales: Sequence[float] | None = None,
          device: str | torch.device = "cpu", split: str = "test", progress: bool = True,
          keep_predictions: bool = False) -> list[EvalRow]:
    """Accuracy of a patched model at each target, without and (if given) with the plugin.

    The model is left as it was found: degree, and plugin attachment, degree and scale.

    Args:
        model: patched timm ViT fine-tuned at degree ``source``.
        targets: degrees (or, without a plugin, any schedule such as a per-block list).
        plugin: a :class:`tocom.Compensator`; each ``scales`` value gives one more row per target
            (default: the plugin's own scale).
        keep_predictions: fill each row's ``predictions`` and ``labels`` (one int per image), for
            paired statistics between rows.
    """
    with restoring(model):
        return _sweep(model, loader, targets, source, plugin, scales, torch.device(device), split, progress,
                      keep_predictions)


def _sweep(model, loader, targets, source, plugin, scales, device, split, progress,
           keep_predictions) -> list[EvalRow]:
    model.to(device).eval()
    targets = [tuple(t) if isinstance(t, list) else t for t in targets]  # hashable config keys
    configs = sweep_configs(model, targets, source, plugin, scales)
    correct = {c: 0 for c in configs}
    seconds = {c: 0.0 for c in configs}
    predicted: dict[tuple[Schedule, float | None], list[int]] = {c: [] for c in configs}
    labels_seen: list[int] = []
    seen = 0
    for batch_index, (images, labels) in enumerate(
            tqdm(loader, desc=f"eval {split}", disable=not progress, leave=False)):
        images, labels = images.to(device), labels.to(device)
        # Loader workers decode the next batch while the first configurations run. Rotating the
        # order gives every configuration every position equally often; merely alternating it
        # charged the contention to the two ends (r=0 without and r=max with the plugin: 8% and
        # 5% apart from identical twins in throughput).
        shift = batch_index % len(configs)
        for target, scale in configs[shift:] + configs[:shift]:
            apply_config(model, target, scale, plugin is not None)
            sync_device(device)
            start = time.perf_counter()
            logits = model(images)
            sync_device(device)
            seconds[(target, scale)] += time.perf_counter() - start
            correct[(target, scale)] += int((logits.argmax(-1) == labels).sum())
            if keep_predictions:
                predicted[(target, scale)] += logits.argmax(-1).tolist()
        if keep_predictions:
            labels_seen += labels.tolist()
        seen += len(labels)
    if seen == 0:
        raise ValueError("the evaluation split is empty")
    return [EvalRow(list(t) if isinstance(t, tuple) else t, source, s is not None, s, correct[(t, s)] / seen,
                    seen / seconds[(t, s)], split, predicted[(t, s)] if keep_predictions else None,
                    labels_seen if keep_predictions else None) for t, s in configs]


def sweep_configs(model: nn.Module, targets: Sequence[Schedule], source: int, plugin: nn.Module | None,
                  scales: Sequence[float] | None) -> list[tuple[Schedule, float | None]]:
    """The (target, scale) pairs a sweep runs, scale None meaning without the plugin.

    Attaches ``plugin`` at ``source`` unless one is attached; ``scales`` default to its own scale.
    """
    configs: list[tuple[Schedule, float | None]] = [(t, None) for t in targets]
    if plugin is not None:
        if not is_attached(model):
            attach(model, plugin, source=source)
        scales = list(scales) if scales else [attachment(model).plugin.spec.scale]
        configs += [(t, s) for t in targets for s in scales]
    return configs


def apply_config(model: nn.Module, target: Schedule, scale: float | None, with_plugin: bool) -> None:
    """Put ``model`` at one sweep configuration (with a plugin attached, scale 0 = exact originals)."""
    if with_plugin:
        set_degree(model, target, scale=0.0 if scale is None else scale)
    else:
        model.r = list(target) if isinstance(target, tuple) else target


def select_scales(val_rows: Sequence[EvalRow]) -> dict[int, float]:
    """Best plugin scale per target on validation rows (ties: the smaller scale)."""
    best: dict[int, EvalRow] = {}
    for row in val_rows:
        if not row.plugin:
            continue
        cur = best.get(row.target)
        if cur is None or (row.accuracy, -row.scale) > (cur.accuracy, -cur.scale):
            best[row.target] = row
    return {t: row.scale for t, row in best.items()}


def sweep_at_selected_scales(run: Callable[[str, Sequence[float], Sequence[Schedule]], list[EvalRow]],
                             scales: Sequence[float], targets: Sequence[Schedule], select_on: str = "val",
                             split: str = "test") -> list[EvalRow]:
    """Pick each target's plugin scale on ``select_on``, then evaluate ``split`` at that scale alone.

    ``run(split, scales, targets)`` returns :func:`sweep` rows (with and without the plugin), so the
    caller decides how the model and data are loaded (and cached). The result holds, per target, the
    no-plugin row and the row at the chosen scale.
    """
    chosen = select_scales(run(select_on, scales, targets))
    return [row for target in targets for row in run(split, [chosen[target]], [target])]

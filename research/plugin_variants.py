"""Several plugins on one fine-tuned model at one (source, target), paired image by image.

    python research/plugin_variants.py MODEL.safetensors --data TASK_DIR --source 0 --target 16 \\
        --plugin base=runs/causes/base.tocom.safetensors feat=runs/causes/feat.tocom.safetensors

Each plugin's scale is picked on val200 from ``--scales`` (as the evidence run does), then the test
split is run at that scale. Reported per plugin: test top-1, its gain over the model without a
plugin and its difference from the first plugin named, each with a paired bootstrap 95% CI over
the test images (one model: the interval says nothing about other fine-tuning seeds). ``--out``
keeps the per-image predictions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import tocom
from tocom.data import load_dataset
from tocom.finetuned import eval_transform_for, load_model
from tocom.jobs.evaluate import make_loader, select_scales, sweep
from tocom.report.provenance import provenance
from tocom.report.stats import PairedDifference, paired_difference


def _points(d: PairedDifference) -> str:
    return f"{100 * d.difference:+.2f} [{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}]"


def table(none: np.ndarray, right: dict[str, np.ndarray],
          scales: dict[str, str]) -> dict[str, tuple[PairedDifference, PairedDifference | None]]:
    """Print each plugin's top-1, gain and difference from the first plugin as a Markdown table.

    ``none``: ``(N,)`` correctness without a plugin; ``right[name]``: ``(N,)`` with it, on the same
    N test images (or (model, image) cells). Returns per plugin (gain, difference from the first).
    """
    first = next(iter(right))
    print("| plugin | scale (val) | top-1 (%) | gain (points) [95% CI] | vs " + first + " [95% CI] |")
    print("|---|---|---|---|---|")
    out = {}
    for name, correct in right.items():
        gain = paired_difference(none, correct)
        versus = None if name == first else paired_difference(right[first], correct)
        print(f"| {name} | {scales[name]} | {100 * correct.mean():.2f} | {_points(gain)} | "
              f"{'-' if versus is None else _points(versus)} |")
        out[name] = (gain, versus)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a tocom finetune checkpoint")
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--data", required=True, help="VTAB-1k task folder")
    p.add_argument("--source", type=int, required=True)
    p.add_argument("--target", type=int, required=True)
    p.add_argument("--plugin", nargs="+", required=True, metavar="NAME=FILE")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", help="JSON file for the rows and per-image predictions")
    args = p.parse_args()
    if any("=" not in item for item in args.plugin):
        p.error("--plugin takes NAME=FILE pairs")
    plugins = dict(item.split("=", 1) for item in args.plugin)
    model = tocom.patch(load_model(args.model, args.checkpoint))
    transform = eval_transform_for(args.checkpoint, model)
    loaders = {split: make_loader(load_dataset(args.data, split, transform), args.batch_size)
               for split in ("val", "test")}
    rows: dict[str, dict] = {}
    base = None
    for name, path in plugins.items():
        plugin = tocom.Compensator.load(path)
        val = sweep(model, loaders["val"], [args.target], args.source, plugin, args.scales, progress=False)
        scale = select_scales(val)[args.target]
        test = sweep(model, loaders["test"], [args.target], args.source, plugin, [scale], progress=False,
                     keep_predictions=True)
        without, with_plugin = (next(r for r in test if r.plugin == flag) for flag in (False, True))
        base = base or without
        rows[name] = {"file": path, "scale": scale, "accuracy": with_plugin.accuracy,
                      "predictions": with_plugin.predictions}
    labels = np.asarray(base.labels)
    right = {name: np.asarray(row["predictions"]) == labels for name, row in rows.items()}
    none = np.asarray(base.predictions) == labels
    print(f"{args.checkpoint}: {args.source} -> {args.target}, {len(labels)} test images; "
          f"without a plugin {100 * none.mean():.2f}%")
    for name, (gain, versus) in table(none, right, {n: f"{r['scale']:g}" for n, r in rows.items()}).items():
        rows[name].update(gain=gain.as_dict(), versus_first=versus and versus.as_dict())
    if args.out:
        Path(args.out).write_text(json.dumps({"provenance": provenance(), "checkpoint": args.checkpoint,
                                              "source": args.source,
                                              "target": args.target, "labels": labels.tolist(),
                                              "without": base.predictions, "plugins": rows}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

"""ToCom appendix Table 11 in miniature: semantic segmentation with dense-mode token merging.

A Segmenter (linear decoder) on the real DeiT-Tiny is fine-tuned at source degree 0 on the
generated segmentation task (shapes pasted on crops of the shared ImageNet sample, ADE20k layout);
a dense-mode plugin is distilled on the ImageNet sample; then mIoU is measured on the test split
at targets 0, 2, ..., 16 without and with the plugin (its scale chosen per target on validation).

The paper's segmentation set-up merges ``32 r`` of 1024 tokens before each MLP at 512 px (its
r = 16 merges half the tokens). tocom's degree is always tokens per block, so at 224 px (196
patches) the paper's r corresponds to ``TOKENS_PER_DEGREE * r`` = 6 r tokens: targets 0, 12, ...,
96 tokens (paper r = 0, 2, ..., 16; 96 of 197 tokens at the top). The plugin has one group per
token of degree (96 groups), so its arithmetic is the usual one.
Every dataset-mIoU difference comes with a paired bootstrap CI over test images
(:mod:`tocom.report.miou`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from research.paper.common import MODEL, SCALES, Lab
from tocom.compensator import Compensator
from tocom.data import SegmentationFolder, SegmentationTransform, write_segmentation_task
from tocom.jobs.distill import DistillConfig, run_distill
from tocom.jobs.evaluate import make_loader
from tocom.jobs.segment import (
    SegmentConfig,
    SegRow,
    patch_for_segmentation,
    run_segment_finetune,
    segment_sweep,
)
from tocom.models import schedule_report
from tocom.report.compare import comparison_table
from tocom.report.miou import paired_miou_difference
from tocom.seg import load_segmenter

TOKENS_PER_DEGREE = 6
PAPER_DEGREES = list(range(0, 17, 2))
TARGETS = [TOKENS_PER_DEGREE * r for r in PAPER_DEGREES]  # tokens merged before each MLP
PAPER = ("ToCom appendix Table 11 (Jie et al., 2024): DeiT-B/384 encoder with Segmenter's Mask "
         "Transformer decoder on ADE20k at 512x512, source r = 0, targets r = 8, 12, 16, with 32 r tokens "
         "merged before each FFN and unmerged after it, single-scale mIoU on the validation set. "
         "**The table's mIoU and GFLOPs values could not be found offline** (the set-up above is "
         "from a third-party summary of the paper, emergentmind.com/articles/2408.06798), so they "
         "are not reproduced here; compare the direction of the effect, not its size: our backbone, "
         "decoder, data and budgets all differ.")


@dataclass(frozen=True)
class SegBudget:
    """Compute of one segmentation run; ``small`` fits a 2-core CPU in well under an hour."""

    train: int = 400
    val: int = 50
    test: int = 150
    epochs: int = 6
    batch_size: int = 16
    distill_steps: int = 150
    distill_batch: int = 32
    resamples: int = 10_000


SEG_BUDGETS = {"small": SegBudget(),
               "smoke": SegBudget(train=16, val=4, test=6, epochs=1, batch_size=8, distill_steps=2,
                                  distill_batch=8, resamples=200)}


def _task(lab: Lab, budget: SegBudget) -> Path:
    folder = lab.work / "data" / f"segshapes-{budget.train}-{budget.val}-{budget.test}"
    if not (folder / "classes.txt").is_file():
        write_segmentation_task(folder, seed=11, image_size=224, backgrounds=lab.pretraining_images,
                                splits={"train": budget.train, "val": budget.val, "test": budget.test},
                                overwrite=True)
    return folder


def _finetuned(lab: Lab, task: Path, budget: SegBudget) -> Path:
    name = f"segshapes{budget.train}_full_dense_r0_{budget.epochs}ep_b{budget.batch_size}.safetensors"
    out = lab.work / "models" / lab.budget_name / name
    if not out.is_file():
        run_dir = Path(str(out) + ".run")
        run_segment_finetune(SegmentConfig(MODEL, task, checkpoint=lab.weights, method="full", r="0",
                                           mode="dense", epochs=budget.epochs, batch_size=budget.batch_size,
                                           out=out, run_dir=run_dir, resume=(run_dir / "last.ckpt").is_file(),
                                           num_workers=0, progress=lab.progress))
    return out


def _plugin(lab: Lab, budget: SegBudget) -> Path:
    name = f"tome_dense_{TARGETS[-1]}_{budget.distill_steps}x{budget.distill_batch}.tocom.safetensors"
    out = lab.work / "plugins" / lab.budget_name / name
    if not out.is_file():
        run_dir = Path(str(out) + ".run")
        run_distill(DistillConfig(MODEL, lab.pretraining_images, checkpoint=lab.weights, method="tome",
                                  mode="dense", max_r=TARGETS[-1], groups=TARGETS[-1],
                                  steps=budget.distill_steps, batch_size=budget.distill_batch, lr=1e-3,
                                  out=out, run_dir=run_dir, resume=(run_dir / "last.ckpt").is_file(),
                                  num_workers=0, progress=lab.progress))
    return out


def _best_scales(rows: list[SegRow]) -> dict[int, float]:
    """Per target, the plugin scale with the best validation mIoU (ties: the smaller scale)."""
    best: dict[int, SegRow] = {}
    for row in rows:
        if row.plugin and (row.target not in best or (row.miou, -row.scale) >
                           (best[row.target].miou, -best[row.target].scale)):
            best[row.target] = row
    return {t: r.scale for t, r in best.items()}


def segmentation(lab: Lab, out: Path) -> dict:
    """Fine-tune at 0, distil a dense plugin, sweep mIoU over targets with and without it."""
    budget = SEG_BUDGETS[lab.budget_name]
    task = _task(lab, budget)
    model_file, plugin_file = _finetuned(lab, task, budget), _plugin(lab, budget)
    model, meta = load_segmenter(model_file)
    patch_for_segmentation(model.backbone, "dense")
    record = meta["preprocessing"]
    transform = SegmentationTransform(record["size"], mean=record["mean"], std=record["std"])
    plugin = Compensator.load(plugin_file)

    def sweep(split: str, targets: list[int], scales: tuple[float, ...]) -> list[SegRow]:
        data = SegmentationFolder(task, split, transform)
        return segment_sweep(model, make_loader(data, 20), targets, 0, plugin, scales, split=split,
                             progress=lab.progress)

    chosen = _best_scales(sweep("val", TARGETS, SCALES))
    test = []  # on test, each target runs without the plugin and at its chosen scale only
    for scale in sorted(set(chosen.values())):
        test += sweep("test", [t for t in TARGETS if chosen[t] == scale], (scale,))
    rows, stats = [], []
    for t in TARGETS:
        base = next(r for r in test if r.target == t and not r.plugin)
        comp = next(r for r in test if r.target == t and r.plugin and r.scale == chosen[t])
        diff = paired_miou_difference(base.confusions, comp.confusions, n_resamples=budget.resamples)
        cost = schedule_report(model.backbone, t)
        rows.append({"target": t, "paper_r": t // TOKENS_PER_DEGREE,
                     "gflops": round(cost["gflops"], 4), "gflops_ratio": round(cost["gflops_ratio"], 4),
                     "miou_without": base.miou, "miou_with": comp.miou, "scale": comp.scale,
                     "pixel_acc_without": base.pixel_acc, "pixel_acc_with": comp.pixel_acc,
                     "stats": diff.as_dict()})
        stats.append((f"r={t} (paper r={t // TOKENS_PER_DEGREE}): with ToCom vs without", diff))
    return {"model": str(model_file), "plugin": str(plugin_file), "task": str(task),
            "tokens_per_degree": TOKENS_PER_DEGREE, "test_images": base.confusions.shape[0],
            "finetune": meta["recipe"], "distill": plugin.spec.recipe, "scales_tried": list(SCALES),
            "rows": rows, "table": comparison_table(stats), "paper": PAPER}



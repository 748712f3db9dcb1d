"""Segmentation: mIoU against a set-based computation, the Segmenter, its files, and fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import tocom
from tocom.data import IGNORE_INDEX, write_segmentation_task
from tocom.seg import (
    Segmenter,
    SegmentObjective,
    confusion_matrix,
    image_confusions,
    iou_per_class,
    load_segmenter,
    mean_iou,
    save_segmenter,
)

ARCH = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **ARCH).eval()


def naive_miou(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    """IoU as sets of pixel positions, class by class; classes in neither are skipped."""
    keep = target != IGNORE_INDEX
    ious = []
    for c in range(k):
        p, t = set(np.flatnonzero((pred == c) & keep)), set(np.flatnonzero((target == c) & keep))
        if p | t:
            ious.append(len(p & t) / len(p | t))
    return sum(ious) / len(ious)


def test_miou_matches_set_definition():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (3, 10, 10), generator=g)
    target = torch.randint(0, 4, (3, 10, 10), generator=g)
    target[0, :3] = IGNORE_INDEX
    target[target == 3] = 2  # class 3 only predicted, never true: IoU 0, still counted
    conf = image_confusions(pred, target, 5)  # class 4 absent everywhere: excluded
    assert conf.shape == (3, 5, 5) and int(conf.sum()) == int((target != IGNORE_INDEX).sum())
    assert torch.equal(conf.sum(0), confusion_matrix(pred, target, 5))
    assert mean_iou(conf.sum(0)) == pytest.approx(naive_miou(pred.numpy(), target.numpy(), 5))
    per_image = mean_iou(conf.numpy())
    assert per_image.shape == (3,)
    assert per_image[1] == pytest.approx(naive_miou(pred[1].numpy(), target[1].numpy(), 5))
    assert np.isnan(iou_per_class(conf.sum(0))[4]) and iou_per_class(conf.sum(0))[3] == 0


def test_miou_perfect_and_bad_labels():
    target = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])
    assert mean_iou(confusion_matrix(target.clamp(max=2), target, 3)) == 1.0
    with pytest.raises(ValueError, match="label 3 is outside 0..2"):
        confusion_matrix(target, torch.tensor([[[0, 1], [3, 0]]]), 3)


def test_segmenter_shapes_and_unmerged_standard_mode():
    model = Segmenter(backbone(), 5)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 5, 32, 32)
    # Each 8x8 patch's logits come from its own token: a linear map of the token, upsampled.
    tokens = model.backbone.forward_features(images)[:, 1:]
    grid = model.decoder(tokens).transpose(1, 2).reshape(2, 5, 4, 4)
    up = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, up, atol=1e-6)
    tocom.patch(model.backbone)  # standard mode without sources cannot give one token per patch
    model.backbone.r = 2
    with pytest.raises(ValueError, match="mode='dense'"):
        model(images)
    tocom.patch(model.backbone, trace_source=True)
    assert model(images).shape == (2, 5, 32, 32)
    with pytest.raises(ValueError, match="num_classes=0"):
        Segmenter(timm.create_model("vit_tiny_patch16_224", num_classes=3, **ARCH), 2)


def test_save_and_load_round_trip(tmp_path):
    model = Segmenter(backbone(), 4)
    path = save_segmenter(model, tmp_path / "s.safetensors", "vit_tiny_patch16_224", ARCH,
                          {"classes": ["a", "b", "c", "d"], "schedule": [0, 0]})
    loaded, meta = load_segmenter(path)
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(images), model(images))
    assert meta["classes"] == ["a", "b", "c", "d"] and meta["schedule"] == [0, 0]
    tocom.models.loading.save_model(model.backbone, tmp_path / "plain.safetensors", "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="not a tocom segmentation checkpoint"):
        load_segmenter(tmp_path / "plain.safetensors")


def test_objective_ignores_ignored_pixels():
    model = Segmenter(backbone(), 3)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 3, (2, 32, 32))
    loss, metrics = SegmentObjective(model)((images, masks))
    masked = masks.clone()
    masked[:, :16] = IGNORE_INDEX
    loss_masked, _ = SegmentObjective(model)((images, masked))
    logits = model(images)
    expected = torch.nn.functional.cross_entropy(logits[:, :, 16:], masks[:, 16:])
    assert loss_masked.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(loss_masked.item())
    assert 0 <= float(metrics["pixel_acc"]) <= 1


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_segmentation_task(tmp_path_factory.mktemp("segjob") / "task", seed=0, image_size=32,
                                   splits={"train": 8, "val": 4, "test": 4})


def test_finetune_cli_trains_and_records(task, tmp_path, capsys):
    from test_distill import tiny_checkpoint

    from tocom.cli import main
    from tocom.data import SegmentationFolder, SegmentationTransform
    from tocom.jobs.evaluate import make_loader
    from tocom.jobs.segment import segment_sweep

    out = tmp_path / "seg.safetensors"
    main(["finetune", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint(tmp_path)), "--data",
          str(task), "--task", "segmentation", "--r", "3", "--epochs", "3", "--batch-size", "4",
          "--lr", "1e-3", "--workers", "0", "--out", str(out)])
    assert "val_miou=" in capsys.readouterr().out
    model, meta = load_segmenter(out)
    assert meta["mode"] == "dense" and meta["schedule"] == [3] * 4 and meta["source_degree"] == 3
    assert meta["recipe"]["steps"] == 6 and meta["classes"][0] == "background"
    assert meta["preprocessing"]["size"] == 32
    assert 0 <= meta["recipe"]["val_miou"] <= 1
    tocom.patch(model.backbone, mode="dense")
    record = meta["preprocessing"]
    data = SegmentationFolder(task, "test", SegmentationTransform(record["size"], mean=record["mean"],
                                                                   std=record["std"]))
    rows = segment_sweep(model, make_loader(data, 2), [0, 2], 3, progress=False)
    assert [r.target for r in rows] == [0, 2] and rows[0].confusions.shape == (4, 6, 6)
    assert rows[0].miou == pytest.approx(mean_iou(rows[0].confusions.sum(0)))
    assert rows[1].miou != rows[0].miou or rows[1].pixel_acc != rows[0].pixel_acc
    capsys.readouterr()
    main(["eval", "vit_tiny_patch16_224", "--checkpoint", str(out), "--data", str(task), "--split", "test",
          "--target", "0", "2", "--json"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [ln["target"] for ln in lines] == [0, 2] and lines[0]["source"] == 3  # recorded source
    assert [ln["miou"] for ln in lines] == pytest.approx([rows[0].miou, rows[1].miou])  # same as the API
    # the sweep's r=0 row is the plain model's mIoU
    tocom.unpatch(model.backbone)
    conf = sum(image_confusions(model(x).argmax(1), m, 6).sum(0) for x, m in make_loader(data, 2))
    assert rows[0].miou == pytest.approx(mean_iou(conf))


def test_paired_miou_bootstrap_against_a_loop():
    from tocom.report.miou import paired_miou_difference

    rng = np.random.default_rng(0)
    a = rng.integers(0, 20, (12, 3, 3))
    b = a.copy()
    b[:, [0, 1, 2], [0, 1, 2]] += rng.integers(0, 6, (12, 3))  # B gets more pixels right
    res = paired_miou_difference(a, b, n_resamples=400, seed=1)
    assert res.accuracy_a == pytest.approx(mean_iou(a.sum(0)))
    assert res.difference == pytest.approx(mean_iou(b.sum(0)) - mean_iou(a.sum(0)))
    # The same draws, image by image in a loop.
    draws = np.random.default_rng(1).integers(0, 12, (400, 12))
    loop = [mean_iou(b[d].sum(0)) - mean_iou(a[d].sum(0)) for d in draws]
    assert (res.ci_low, res.ci_high) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])))
    assert res.ci_low > 0 and res.excludes_zero
    same = paired_miou_difference(a, a, n_resamples=100)
    assert same.difference == same.ci_low == same.ci_high == 0
    with pytest.raises(ValueError, match="same images"):
        paired_miou_difference(a, b[:5])


def test_sweep_with_a_dense_plugin(task):
    from tocom.compensator import Compensator
    from tocom.data import SegmentationFolder, SegmentationTransform
    from tocom.jobs.evaluate import make_loader
    from tocom.jobs.segment import segment_sweep

    model = Segmenter(tocom.patch(backbone(), mode="dense"), 6)
    plugin = Compensator.init_for(model.backbone, groups=4, rank=2, mode="dense")
    with torch.no_grad():
        plugin.B.normal_(0, 0.2)
    data = SegmentationFolder(task, "test", SegmentationTransform(32))
    rows = segment_sweep(model, make_loader(data, 2), [0, 4], 0, plugin, [0.5], progress=False)
    by = {(r.target, r.plugin): r for r in rows}
    assert len(rows) == 4
    assert np.array_equal(by[(0, True)].confusions, by[(0, False)].confusions)  # no delta at the source
    assert not np.array_equal(by[(4, True)].confusions, by[(4, False)].confusions)
    standard = Segmenter(tocom.patch(backbone(), trace_source=True), 6)
    with pytest.raises(ValueError, match="distilled in dense mode"):
        segment_sweep(standard, make_loader(data, 2), [0], 0, plugin, progress=False)


def test_experiment_scale_choice_and_page():
    from research.paper.render import segmentation_markdown as markdown
    from research.paper.segmentation import PAPER, _best_scales
    from tocom.jobs.segment import SegRow

    rows = [SegRow(12, 0, True, 0.1, 0.5, 0.9, 1.0), SegRow(12, 0, True, 0.05, 0.5, 0.9, 1.0),
            SegRow(12, 0, True, 0.2, 0.4, 0.9, 1.0), SegRow(12, 0, False, None, 0.6, 0.9, 1.0),
            SegRow(24, 0, True, 0.3, 0.7, 0.9, 1.0)]
    assert _best_scales(rows) == {12: 0.05, 24: 0.3}  # best mIoU, ties to the smaller scale
    page = markdown({"budget": "smoke", "wall_s": 1.0, "finetune": {"images": 4, "epochs": 1},
                     "distill": {"steps": 2}, "tokens_per_degree": 6, "test_images": 3,
                     "rows": [{"target": 12, "paper_r": 2, "gflops": 1.2, "gflops_ratio": 0.97,
                               "miou_without": 0.25, "miou_with": 0.3, "scale": 0.05}],
                     "table": "| t |", "paper": PAPER})
    assert "| 12 | 2 | 1.200 (0.970) | 25.0 | 30.0 | 0.05 |" in page
    assert "could not be found offline" in page

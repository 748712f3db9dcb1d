"""The degree sweep: accuracies, per-image predictions, and scale selection on val."""

from __future__ import annotations

import torch
from conftest import tiny_vit
from torch.utils.data import TensorDataset

import tocom
from tocom.jobs.evaluate import EvalRow, make_loader, sweep, sweep_at_selected_scales

G = torch.Generator().manual_seed(1)
DATA = TensorDataset(torch.randn(10, 3, 32, 32, generator=G), torch.randint(0, 5, (10,), generator=G))


def test_predictions_are_the_models_argmax_per_image_and_give_the_accuracy():
    model = tocom.patch(tiny_vit())
    rows = sweep(model, make_loader(DATA, 4), [0, 2], 0, keep_predictions=True, progress=False)
    images, labels = DATA.tensors
    for row in rows:
        model.r = row.target
        with torch.no_grad():
            expected = model(images).argmax(-1).tolist()
        assert row.predictions == expected and row.labels == labels.tolist()
        assert row.accuracy == sum(p == y for p, y in zip(expected, labels.tolist())) / len(labels)
        assert "predictions" not in row.as_dict()


def test_selected_scale_is_the_best_on_val_and_only_it_runs_on_test():
    calls = []
    val_acc = {0.05: 0.5, 0.1: 0.7, 0.2: 0.7}  # a tie goes to the smaller scale

    def run(split, scales, targets):
        calls.append((split, list(scales), list(targets)))
        rows = []
        for t in targets:
            rows.append(EvalRow(t, 0, False, None, 0.4, 1.0, split))
            rows += [EvalRow(t, 0, True, s, val_acc[s] if split == "val" else 0.6, 1.0, split)
                     for s in scales]
        return rows

    rows = sweep_at_selected_scales(run, [0.05, 0.1, 0.2], [8, 16])
    assert calls == [("val", [0.05, 0.1, 0.2], [8, 16]), ("test", [0.1], [8]), ("test", [0.1], [16])]
    assert [(r.target, r.plugin, r.scale) for r in rows] == [(8, False, None), (8, True, 0.1),
                                                             (16, False, None), (16, True, 0.1)]

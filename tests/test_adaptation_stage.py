"""The adapt stage's analysis on synthetic records: gap fractions and paired differences."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from research.paper import adaptation

TARGETS = (0, 8, 16)


def correctness(n: int, right: int, seed: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng(seed).permutation(n)[:right]] = True
    return out


def test_gap_fraction_is_the_share_of_the_mismatch_gap():
    none, plugin, matched = correctness(400, 200, 0), correctness(400, 260, 1), correctness(400, 320, 2)
    result = adaptation.gap_fraction([(none, plugin, matched)], n_resamples=2000)
    assert result["fraction"] == pytest.approx((260 - 200) / (320 - 200))
    assert result["gap_points"] == pytest.approx(30.0)
    assert result["ci_low"] < 0.5 < result["ci_high"] and 0 < result["ci_low"] and result["ci_high"] < 1


def _row(target, plugin, scale, correct, labels):
    return {"target": target, "source": 0, "plugin": plugin, "scale": scale,
            "predictions": np.where(correct, labels, labels + 1).tolist(), "labels": labels.tolist()}


def record(source: int, accuracy: dict, n: int = 300) -> dict:
    """A record whose arms get ``accuracy[(arm, target)]`` right (fractions of ``n``)."""
    labels = np.arange(n) % 5
    test = [_row(t, False, None, correctness(n, round(accuracy[("none", t)] * n), t), labels)
            for t in TARGETS]
    test += [_row(t, True, 0.1, correctness(n, round(accuracy[("universal", t)] * n), 10 + t), labels)
             for t in TARGETS if t != source]
    adapted = [_row(t, True, 0.1, correctness(n, round(accuracy[("adapted", t)] * n), 20 + t), labels)
               for t in TARGETS if t != source]
    return {"task": "count", "source": source, "seed": 0, "selected": {str(t): 0.1 for t in TARGETS},
            "test": test, "adapted_test": adapted, "curve": [],
            "adapted_record": {"wall_s": 240.0, "picked_step": 50}, "model": f"count_r{source}.safetensors",
            "model_sha256": "ab" * 32, "adapted": f"count_r{source}.adapted.tocom.safetensors",
            "ran_on": {"commit": "c0ffee", "device": "cpu"}}


def test_analyze_reports_the_declared_endpoints(tmp_path, monkeypatch):
    acc0 = {("none", 0): .9, ("none", 8): .85, ("none", 16): .70, ("universal", 8): .86,
            ("universal", 16): .75, ("adapted", 8): .88, ("adapted", 16): .82}
    acc16 = {("none", 0): .80, ("none", 8): .84, ("none", 16): .86, ("universal", 0): .83,
             ("universal", 8): .85, ("adapted", 0): .88, ("adapted", 8): .86}
    paths = {0: tmp_path / "r0.json", 16: tmp_path / "r16.json"}
    paths[0].write_text(json.dumps(record(0, acc0)))
    paths[16].write_text(json.dumps(record(16, acc16)))
    p = SimpleNamespace(adapt_tasks=("count",), adapt_seeds=(0,), sources=(0, 16), targets=TARGETS,
                        adapt_steps=120, adapt_batch=32, adapt_lr=1e-3, adapt_plugin_seed=0)
    monkeypatch.setattr(adaptation, "record_path", lambda ev, task, source, seed: paths[source])
    monkeypatch.setattr(adaptation, "RESAMPLES", 500)
    result = json.loads(adaptation.analyze(SimpleNamespace(p=p), tmp_path / "out").read_text())
    a1, a2 = result["endpoints"]["A1"], result["endpoints"]["A2"]
    assert a1["adapted"]["fraction"] == pytest.approx((.82 - .70) / (.86 - .70))
    assert a1["universal"]["fraction"] == pytest.approx((.75 - .70) / (.86 - .70))
    assert a2["adapted"]["fraction"] == pytest.approx((.88 - .80) / (.90 - .80))
    assert result["endpoints"]["A3 0->16"]["difference"] == pytest.approx(.82 - .75)
    assert result["endpoints"]["A3 16->0"]["difference"] == pytest.approx(.88 - .83)
    assert len(result["pairs"]) == 4 and result["minutes"][0]["minutes"] == pytest.approx(4.0)
    # the analysis' own provenance, and each unit's run as its record states it
    assert {"commit", "versions", "device"} <= set(result["provenance"])
    assert [(u["source"], u["ran_on"]["commit"]) for u in result["units"]] == [(0, "c0ffee"), (16, "c0ffee")]
    page = (tmp_path / "out" / "adapt.md").read_text()
    assert "A1: fraction of the gap closed | 0->16 | **0.75**" in page


def test_test_rows_attach_a_plugin_and_skip_its_source(monkeypatch):
    """The stage's test pass on a tiny model: each arm's predictions match the model run by hand
    at that target, and a plugin row is skipped at the source, where its delta is zero."""
    import torch
    from conftest import random_plugin, tiny_vit
    from torch.utils.data import TensorDataset

    from tocom.compensator import attach, set_degree
    from tocom.models import patch

    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(12) % 5
    monkeypatch.setattr(adaptation, "load_model", lambda name, path: tiny_vit())
    monkeypatch.setattr(adaptation, "eval_transform_for", lambda path, model: None)
    ev = SimpleNamespace(device="cpu", progress=False, p=SimpleNamespace(eval_batch=5),
                         _eval_images=lambda task, split, transform: TensorDataset(images, labels))
    plugin = random_plugin(patch(tiny_vit()), groups=4)
    plain = adaptation.test_rows(ev, None, "count", 0, None, {}, [0, 2, 4])
    rows = adaptation.test_rows(ev, None, "count", 0, plugin, {2: 0.5}, [0, 2, 4])
    assert [r["target"] for r in plain] == [0, 2, 4] and [r["target"] for r in rows] == [2, 4]
    assert [r["scale"] for r in rows] == [0.5, plugin.spec.scale]

    model = patch(tiny_vit())
    with torch.no_grad():
        for row in plain:
            model.r = row["target"]
            assert row["predictions"] == model(images).argmax(-1).tolist()
        attach(model, plugin, source=0)
        for row, scale in zip(rows, (0.5, None)):
            set_degree(model, row["target"], scale=scale)
            assert row["predictions"] == model(images).argmax(-1).tolist()
            assert row["labels"] == labels.tolist()

"""The evidence analysis on synthetic prediction records: endpoints are the paired differences they claim."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from research.paper.evidence import PROTOCOLS
from research.paper.evidence_report import Analysis

P = PROTOCOLS["smoke"]  # tasks cifar10, count; sources 0, 16; targets 0, 16; one seed of each
N = 50
RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 3, N).tolist()


def predictions(accuracy: float) -> list[int]:
    """Predictions right on the first ``accuracy * N`` images, wrong on the rest."""
    k = round(accuracy * N)
    return [y if i < k else (y + 1) % 3 for i, y in enumerate(LABELS)]


def record(task: str, source: int, accuracies: dict) -> dict:
    rows = []
    for target in P.targets:
        rows.append({"target": target, "plugin": False, "scale": None,
                     "predictions": predictions(accuracies[(target, None)]), "labels": LABELS})
        for scale in (0.1,):
            rows.append({"target": target, "plugin": True, "scale": scale,
                         "predictions": predictions(accuracies[(target, scale)]), "labels": LABELS})
    return {"task": task, "source": source, "seed": 0, "model": f"{task}_{source}",
            "plugins": {"0": {"selected": {str(t): 0.1 for t in P.targets}, "test": rows}}}


@pytest.fixture
def analysis():
    records = []
    for task in P.tasks:
        # r=0 model: 0.8 at 0, 0.6 at 16 (0.7 with the plugin); r=16 model: 0.7 at 0, 0.8 at 16.
        records.append(record(task, 0, {(0, None): 0.8, (0, 0.1): 0.8, (16, None): 0.6, (16, 0.1): 0.7}))
        records.append(record(task, 16, {(0, None): 0.7, (0, 0.1): 0.66, (16, None): 0.8, (16, 0.1): 0.8}))
    return Analysis(SimpleNamespace(p=P), records)


def test_gain_gap_and_closure_are_the_hand_computed_values(analysis):
    assert analysis.gain(0, 16).difference == pytest.approx(0.1)
    assert analysis.gain(16, 0).difference == pytest.approx(-0.04)
    assert analysis.gap(0, 16).difference == pytest.approx(0.2)  # matched model 0.8 vs 0.6
    assert analysis.closure(0, 16)["fraction"] == pytest.approx(0.5)
    assert analysis.closure(0, 16, "fixed")["fraction"] == pytest.approx(0.5)  # fixed s = selected s here
    closure = analysis.closure(0, 16)
    assert closure["seeds_ci_low"] <= 0.5 <= closure["seeds_ci_high"] and closure["seeds_no_gap"] < 0.05
    gain = analysis.gain(0, 16)
    assert gain.ci_low > 0  # 5 images of 50 flipped in each of two tasks, none the other way
    assert analysis.gain(16, 0).ci_high <= 0


def test_records_hold_one_row_per_configuration(analysis):
    records = analysis.records("cifar10")
    # per source: targets x (no plugin + one scale)
    assert records.pred.shape == (len(P.sources) * len(P.targets) * 2, N)
    selected = records.find({"source": 0, "target": 16, "selected": True})
    assert len(selected) == 1 and records.correct(selected[0]).mean() == pytest.approx(0.7)


def test_shards_split_every_stage_into_disjoint_parts_that_cover_it(tmp_path):
    from research.paper.evidence import Evidence
    from tocom.data import shared_dir

    if not (shared_dir() / "weights").is_dir():
        pytest.skip("needs ../shared (the evidence run's real weights)")
    units = [(t, s, seed) for seed in (0, 1, 2) for t in ("a", "b") for s in (0, 16)]
    parts = []
    for i in range(3):
        ev = Evidence(tmp_path, "smoke", progress=False, shard=(i, 3))
        parts.append(list(ev._todo("finetune", units, lambda u: tmp_path / "missing")))
    assert sorted(u for part in parts for u in part) == sorted(units)
    assert all(len(part) == 4 for part in parts)
    with pytest.raises(ValueError, match="shard"):
        Evidence(tmp_path, "smoke", shard=(3, 3))


def test_shard_option_is_checked():
    import argparse

    from research.paper.__main__ import shard

    assert shard("1/3") == (1, 3)
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(argparse.ArgumentTypeError, match="shard"):
            shard(bad)


def test_gap_control_is_a_seeded_direction_of_equal_norm():
    import torch

    from research.paper.suite import _random_like

    delta = torch.randn(64, 32) * 0.01
    a = _random_like(delta, torch.Generator().manual_seed(0))
    b = _random_like(delta, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == delta.dtype
    assert a.norm().item() == pytest.approx(delta.norm().item(), rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), delta.flatten(), dim=0)
    assert abs(cosine.item()) < 0.1  # random in 2048 dimensions: nearly orthogonal to the gap
    assert torch.equal(_random_like(torch.zeros(3), torch.Generator()), torch.zeros(3))


def test_experiment_results_record_their_provenance(tmp_path):
    import json
    import time

    from research.paper.common import write_results

    rows = [{"from": "a", "to": "b", "M0_at_16": 0.5, "M0_plus_gap_at_16": 0.6, "gain": 0.1}]
    path = write_results("gap", {"budget": "smoke", "rows": rows}, tmp_path, time.time())
    written = json.loads(path.read_text())
    assert {"commit", "dirty", "versions", "device"} <= set(written["provenance"])
    assert written["rows"] == rows and path.with_suffix(".md").is_file()


def test_the_declared_protocol_is_the_one_the_published_results_record():
    """research/paper/protocols/paper-mini.json against the fields docs/results/*.json were made with."""
    import dataclasses
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    declared = json.loads(json.dumps(dataclasses.asdict(PROTOCOLS["paper-mini"])))  # tuples as lists
    recorded = json.loads((results / "evidence.json").read_text())["provenance"]
    recorded.update(json.loads((results / "adapt.json").read_text())["protocol"])
    shared = set(declared) & set(recorded)
    assert set(declared) == shared  # every field of the protocol was recorded
    assert {k: declared[k] for k in shared} == {k: recorded[k] for k in shared}


def test_a_protocol_file_must_give_exactly_the_fields(tmp_path):
    import dataclasses
    import json

    from research.paper.evidence import load_protocol

    fields = dataclasses.asdict(PROTOCOLS["smoke"])
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**fields, "epochz": 3}))
    with pytest.raises(ValueError, match=r"unknown \['epochz'\]"):
        load_protocol(path)
    del fields["epochs"]
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"missing \['epochs'\]"):
        load_protocol(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON protocol"):
        load_protocol(path)

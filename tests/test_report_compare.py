"""Declared comparisons over prediction records, their Markdown table and the ``tocom report`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tocom.cli import main
from tocom.report.cli import parse_filter
from tocom.report.compare import Comparison, compare, comparison_table
from tocom.report.records import Records, write_records

PLUGIN = Comparison("plugin at 16", {"target": 16, "plugin": None}, {"target": 16, "plugin": "p"})


def _task(task: str, n: int, rng: np.random.Generator, plugin_seeds: int = 1) -> tuple[Records, dict]:
    """Three fine-tuning seeds, each without the plugin and with it (``plugin_seeds`` times) at 16."""
    label = rng.integers(0, 10, n)
    runs, truth = [], {}
    for seed in range(3):
        without = np.where(rng.random(n) < 0.6, label, (label + 1) % 10)
        runs.append(({"task": task, "seed": seed, "target": 16, "plugin": None}, without))
        for ps in range(plugin_seeds):
            with_ = np.where(rng.random(n) < 0.7, label, without)
            runs.append(({"task": task, "seed": seed, "target": 16, "plugin": "p", "plugin_seed": ps}, with_))
            truth[(seed, ps)] = (without == label, with_ == label)
        runs.append(({"task": task, "seed": seed, "target": 8, "plugin": None}, label))
    return Records.from_runs(np.arange(n) * 3, label, runs, f"{task}.predictions.npz"), truth


def test_runs_pair_by_seed_and_pool_tasks_equally():
    rng = np.random.default_rng(0)
    (r1, t1), (r2, t2) = _task("cifar10", 300, rng), _task("count", 120, rng)
    out = compare([r1, r2], PLUGIN, n_resamples=2000)
    per_task = [np.mean([b.mean() - a.mean() for a, b in t.values()]) for t in (t1, t2)]
    assert out.stats.difference == pytest.approx(np.mean(per_task))
    assert (out.stats.n_seeds, out.stats.n_strata, out.stats.n_images) == (6, 2, 420)
    assert out.runs[:3] == ("task=cifar10 seed=0", "task=cifar10 seed=1", "task=cifar10 seed=2")
    a, b = t2[(1, 0)]
    fifth = out.stats.mcnemar[4]  # count, seed 1
    assert (fifth.a_only, fifth.b_only) == (int((a & ~b).sum()), int((b & ~a).sum()))
    assert out.stats.ci_low < out.stats.difference < out.stats.ci_high and out.stats.scheme == "seeds+images"


def test_one_model_pairs_with_each_plugin_seed():
    records, truth = _task("cifar10", 200, np.random.default_rng(1), plugin_seeds=2)
    out = compare([records], PLUGIN, n_resamples=1000)
    assert len(out.runs) == 6
    assert out.stats.difference == pytest.approx(np.mean([b.mean() - a.mean() for a, b in truth.values()]))


def test_configurations_from_two_files_on_the_same_images_pair():
    records, _ = _task("cifar10", 100, np.random.default_rng(2))
    without = records.find(PLUGIN.a)
    rest = [i for i in range(len(records.configs)) if i not in without]
    part = lambda rows, name: Records(records.index, records.label, records.pred[rows],
                                      tuple(records.configs[i] for i in rows), name)
    split = [part(without, "x.npz"), part(rest, "y.npz")]
    apart, together = compare(split, PLUGIN, n_resamples=500), compare([records], PLUGIN, n_resamples=500)
    assert apart.stats == together.stats


def test_ambiguous_or_unpaired_comparisons_are_refused():
    records, _ = _task("cifar10", 50, np.random.default_rng(3), plugin_seeds=2)
    with pytest.raises(ValueError, match="matches 2 configurations for a and 2 for b with task=cifar10;"):
        compare([records], Comparison(
            "x", {"plugin": None, "seed": 0}, {"plugin": "p", "seed": 0}, ("task",)))
    with pytest.raises(ValueError, match="matches both a and b"):
        compare([records], Comparison("x", {"target": 16}, {"plugin": "p"}))
    with pytest.raises(ValueError, match="seed=1 for b but none for a"):
        compare([records], Comparison("x", {"target": 8, "seed": 0}, {"plugin": "p", "plugin_seed": 0}))
    with pytest.raises(ValueError, match="no configuration"):
        compare([records], Comparison("x", {"target": 4}, {"target": 12}))


def test_comparison_table_shows_points_and_interval():
    a = np.array([True] * 64 + [False] * 36)
    b = a.copy()
    b[64:67] = True  # three more right: +3 points
    from tocom.report.stats import paired_difference

    table = comparison_table([("three images", paired_difference(a, b, n_resamples=1000))])
    header, rule, row = table.splitlines()
    assert "95% CI" in header and rule.startswith("|---")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["three images", "64.0", "67.0"]
    assert cells[3].startswith("+3.00 [+") and cells[4] == "0.25" and cells[5:] == ["100", "1"]  # p = 2/8


def test_parse_filter_reads_json_values():
    assert parse_filter("target=16,plugin=null,method=tome,scale=0.2") == {
        "target": 16, "plugin": None, "method": "tome", "scale": 0.2}
    assert parse_filter('{"task": "count"}') == {"task": "count"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_filter("target")


def test_report_command_prints_declared_and_ad_hoc_comparisons(tmp_path: Path, capsys):
    records, _ = _task("cifar10", 200, np.random.default_rng(4))
    write_records(tmp_path / "gains.predictions.npz", records)
    declared = {"name": PLUGIN.name, "a": PLUGIN.a, "b": PLUGIN.b}
    (tmp_path / "gains.json").write_text(json.dumps({"rows": [], "comparisons": [declared]}))
    main(["report", str(tmp_path / "gains.json"), "--resamples", "500"])
    out = capsys.readouterr().out
    expected = compare([records], PLUGIN, n_resamples=500).stats
    assert f"| plugin at 16 | {100 * expected.accuracy_a:.1f} | {100 * expected.accuracy_b:.1f} |" in out
    main(["report", str(tmp_path / "gains.json"), "--a", "target=16,plugin=null", "--b", "target=8",
          "--resamples", "500", "--json"])
    line = json.loads(capsys.readouterr().out)
    assert line["accuracy_b"] == 1.0 and line["runs"] == ["task=cifar10 seed=0", "task=cifar10 seed=1",
                                                         "task=cifar10 seed=2"]
    (tmp_path / "bare.json").write_text("{}")
    write_records(tmp_path / "bare.predictions.npz", records)
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "bare.json")])
    assert "declares no comparisons" in capsys.readouterr().err

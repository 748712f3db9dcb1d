"""`tocom demo --quick` end to end on the generated fallback (no ../shared)."""

import json

import pytest

from tocom.compensator import Compensator
from tocom.jobs.demo import run_demo


@pytest.fixture
def no_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("TOCOM_SHARED", str(tmp_path / "absent"))


def test_quick_demo_writes_table_results_and_plot(tmp_path, no_shared, capsys):
    out = tmp_path / "demo"
    rows = run_demo(out, quick=True, progress=False)

    targets = (0, 2, 4, 6, 8)
    expected = sorted((t, p) for t in targets for p in (False, True))
    assert sorted((r["target"], r["plugin"]) for r in rows) == expected
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["throughput"] > 0
    # The distilled plugin is not a no-op: it moves W_q/W_v at the largest target.
    plugin = Compensator.load(out / "compensator.tocom.safetensors")
    assert plugin.deltas(0, max(targets)).abs().amax() > 1e-4

    report = json.loads((out / "results.json").read_text())
    assert report["eval_images"] == 200 and report["rows"] == rows
    assert (out / "accuracy.png").stat().st_size > 0
    assert (out / "compensator.tocom.safetensors").is_file()

    printed = capsys.readouterr().out
    assert "pre-training a small ViT" in printed
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1:-1] == [" target r ", " plugin ", " top-1 % ", " images/s "]
    assert len(table) == 1 + len(rows)
    assert all(cell.strip().count(".") == 1 for line in table[1:] for cell in line.split("|")[3:5])

"""The variants and pyra analyses on synthetic records written where the stages write them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from research.paper.evidence import Evidence
from research.paper.evidence_report import (
    pyra_curves,
    pyra_records,
    pyra_results,
    render_extra,
    variant_results,
    write_pyra_outputs,
)
from tocom.report.records import read_records

N = 40
LABELS = [i % 4 for i in range(N)]


def predictions(accuracy: float) -> list[int]:
    """Right on the first ``accuracy * N`` images, wrong on the rest."""
    k = round(accuracy * N)
    return [y if i < k else (y + 1) % 4 for i, y in enumerate(LABELS)]


@pytest.fixture
def ev(tmp_path, monkeypatch):
    """An Evidence of the smoke protocol over a stand-in shared folder (no real weights needed)."""
    shared = tmp_path / "shared"
    for name, text in (("weights/deit_tiny_patch16_224.safetensors", "w"),
                       ("data/imagenet-sample/a.jpg", "i"), ("data/vtab-1k/cifar10/test.txt", "c")):
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).write_text(text)
    monkeypatch.setenv("TOCOM_SHARED", str(shared))
    e = Evidence(tmp_path / "work", "smoke", progress=False)
    (e.work / "data/count").mkdir(parents=True)
    (e.work / "data/count/test.txt").write_text("n")  # stands in the generated task
    return e


def write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def rows(target: int, without: float, plugin: float | None) -> list[dict]:
    out = [{"target": target, "plugin": False, "scale": None, "predictions": predictions(without),
            "labels": LABELS}]
    if plugin is not None:
        out.append({"target": target, "plugin": True, "scale": 0.1, "predictions": predictions(plugin),
                    "labels": LABELS})
    return out


def standard_records(ev: Evidence) -> list[dict]:
    """r=0 models: 0.5 at 16; r=16 models: 0.9 at 16 and 0.6 at 0 (r=0 models are 0.8 at 0)."""
    records = []
    for task, source, seed in ev.models():
        if source == 0:
            test = rows(0, 0.8, None) + rows(16, 0.5, 0.6)
        else:
            test = rows(16, 0.9, None) + rows(0, 0.6, 0.6)
        records.append({"task": task, "source": source, "seed": seed, "model": f"{task}{source}",
                        "plugins": {"0": {"selected": {"16": 0.1, "0": 0.1}, "test": test}}})
    return records


def write_variant(ev: Evidence, variant: str, at_16: float) -> None:
    for task, source, seed in ev.models():
        target = ev.endpoint_target(source)
        test = rows(16, 0.5, at_16) if source == 0 else rows(0, 0.6, 0.6)
        write(ev.predictions_path(ev.model_path(task, source, seed), variant),
              {"task": task, "source": source, "seed": seed, "model": f"{task}{source}",
               "plugins": {"0": {"selected": {str(target): 0.1}, "test": test}}})


def test_each_variant_is_compared_with_the_reference_on_the_same_models(ev):
    assert ev.variant_records() == ("reference", "feat")
    records = standard_records(ev)
    assert variant_results(ev, records, (0,))["not run"] == ["reference", "feat"]
    write_variant(ev, "reference", 0.6)
    write_variant(ev, "feat", 0.8)
    out = variant_results(ev, records, (0,))
    feat, reference = out["variants"]["feat"], out["variants"]["reference"]
    assert reference["gain 0->16"]["difference"] == pytest.approx(0.1)
    assert feat["gain 0->16"]["difference"] == pytest.approx(0.3)
    assert feat["vs reference 0->16"]["difference"] == pytest.approx(0.2)
    assert feat["vs reference 0->16"]["ci_low"] > 0  # 8 of 40 images flip, none back, in each task
    # gap at 16: matched model 0.9 against 0.5, taken from the standard records
    assert feat["closure"]["fraction"] == pytest.approx(0.3 / 0.4)
    assert reference["closure"]["fraction"] == pytest.approx(0.1 / 0.4)
    assert "| feat | +30.00" in render_extra(out, {"not run": "x"})


def write_pyra_units(ev, test: dict[str, float], val: dict[str, float]) -> None:
    """Seed 0's record of every (task, arm) of the pyra stage, with test accuracy ``test[method]``
    and a two-point val curve ending at ``val[method]``."""
    for task in ev.p.tasks:
        for method, lr in ev.pyra_arms():
            model = ev.pyra_path(task, 0, method, lr)
            write(ev._pyra_record(model), {
                "task": task, "seed": 0, "method": method, "modulator_lr": lr, "model": model.name,
                "val_acc": val[method], "schedule": [2, 2], "curve": [[1, 0.25], [2, val[method]]],
                "test": {"predictions": predictions(test[method]), "labels": LABELS}})


def test_pyra_endpoint_picks_the_rate_on_val_and_pools_whole_seeds(ev):
    assert pyra_results(ev, *pyra_records(ev, (0,))) == {
        "not run": "no seed has every PYRA and LoRA unit: run the pyra stage"}
    write_pyra_units(ev, test={"lora": 0.5, "pyra": 0.7}, val={"lora": 0.5, "pyra": 0.9})
    out = pyra_results(ev, *pyra_records(ev, (0,)))
    assert out["modulator_lr_chosen"] == {t: ev.p.pyra_modulator_lrs[0] for t in ev.p.tasks}
    assert out["endpoint"]["difference"] == pytest.approx(0.2)
    assert out["endpoint"]["accuracy_a"] == pytest.approx(0.5)
    assert np.isfinite(out["endpoint"]["ci_low"]) and out["endpoint"]["ci_low"] > 0
    assert "**+20.00" in render_extra({"not run": [], "variants": {}}, out)


def test_pyra_predictions_and_curves_are_written_per_task(ev, tmp_path):
    write_pyra_units(ev, test={"lora": 0.5, "pyra": 0.75}, val={"lora": 0.5, "pyra": 0.75})
    units, seeds = pyra_records(ev, (0, 1))
    assert seeds == (0,) and len(units) == len(ev.p.tasks) * len(ev.pyra_arms())
    files = write_pyra_outputs(ev, units, pyra_curves(ev, units), tmp_path / "out")
    assert files == [*(f"evidence-pyra-{t}.predictions.npz" for t in ev.p.tasks), "evidence-pyra.png"]
    records = read_records(tmp_path / "out" / files[0])
    assert records.label.tolist() == LABELS and len(records.configs) == len(ev.pyra_arms())
    (lora,) = records.find({"method": "lora"})
    (pyra,) = records.find({"method": "pyra", "modulator_lr": ev.p.pyra_modulator_lrs[0]})
    assert (records.pred[lora] == records.label).mean() == 0.5
    assert (records.pred[pyra] == records.label).mean() == 0.75
    assert (tmp_path / "out" / "evidence-pyra.png").stat().st_size > 0
    curves = pyra_curves(ev, units)
    assert curves["ToMe + LoRA"] == [(1, 0.25), (2, 0.5)]
    assert curves[f"PYRA, modulator lr {ev.p.pyra_modulator_lrs[0]:g}"] == [(1, 0.25), (2, 0.75)]
    # one LoRA unit evaluated a step less: only the step every unit has is averaged
    units[(ev.p.tasks[0], 0, "lora", None)]["curve"] = [[1, 0.25]]
    assert pyra_curves(ev, units)["ToMe + LoRA"] == [(1, 0.25)]


def test_pyra_units_without_a_validation_accuracy_are_flagged(ev):
    write_pyra_units(ev, test={"lora": 0.5, "pyra": 0.7}, val={"lora": 0.5, "pyra": 0.9})
    units, _ = pyra_records(ev, (0,))
    path = ev._pyra_record(ev.pyra_path(ev.p.tasks[0], 0, "lora", None))
    write(path, {**units[(ev.p.tasks[0], 0, "lora", None)], "val_acc": None})
    out = pyra_results(ev, *pyra_records(ev, (0,)))
    assert math.isnan(out["val_acc"][f"{ev.p.tasks[0]} lora"])
    assert "Some units have no validation accuracy" in render_extra({"not run": [], "variants": {}}, out)


def test_the_command_line_accepts_every_stage():
    from research.paper.__main__ import build_parser
    from research.paper.evidence import STAGES

    args = build_parser().parse_args(["all", "--stage", *STAGES])
    assert tuple(args.stage) == STAGES


def test_tocom_experiment_points_to_the_research_runner(capsys):
    from tocom.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["experiment", "all", "--stage", "adapt"])
    assert stop.value.code == 2
    assert "python -m research.paper all --stage adapt" in capsys.readouterr().err


def test_deit_augmentation_survives_posterize_at_full_magnitude():
    """RandAugment's increasing posterize keeps 0 bits at magnitude 10, which recent Pillow refuses."""
    from PIL import Image

    from tocom.data import train_transform

    transform = train_transform("deit", img_size=32)
    ops = [op for step in transform.transforms for op in getattr(step, "ops", [])
           if op.name.startswith("Posterize")]
    assert ops, "the DeiT recipe lost its posterize op"
    image = Image.new("RGB", (40, 40), (200, 120, 30))
    black = ops[0].aug_fn(image, *ops[0].level_fn(10.0, ops[0].hparams))
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
    for op in ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0  # always, at full strength
    assert transform(image).shape == (3, 32, 32)


def test_table5_ablation_plugins_hold_as_many_parameters_as_the_standard_one():
    """The paper compares its ablations at equal parameters; a rank that drifted would not."""
    from conftest import tiny_vit

    from research.paper.evidence import ABLATIONS, STANDARD_GROUPS, STANDARD_RANK
    from tocom.compensator import Compensator

    model = tiny_vit()
    size = lambda **kw: sum(p.numel() for p in Compensator.init_for(  # noqa: E731
        model, groups=STANDARD_GROUPS, **kw).parameters())
    standard = size(rank=STANDARD_RANK)
    assert standard > 0
    for name, settings in ABLATIONS.items():
        shape = {"rank": STANDARD_RANK, **{k: v for k, v in settings.items() if k in ("rank", "variant")}}
        assert size(**shape) == standard, name
    assert {s.get("variant") for s in ABLATIONS.values()} >= {"shared", "no_inversion"}


def test_distill_split_gives_each_part_the_labels_of_its_images(ev):
    source = ev.shared / "data/imagenet-sample"
    for i in range(1, 12):
        (source / f"img{i:02d}.jpg").write_text("i")
    names = sorted(p.name for p in source.iterdir() if p.suffix == ".jpg")
    (source / "labels.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    train, held = ev.distill_split()
    lines = {part: (part / "labels.txt").read_text().split("\n")[:-1] for part in (train, held)}
    assert lines[held] == [f"{n} {i}" for i, n in enumerate(names) if i % 10 == 0]
    assert lines[train] == [f"{n} {i}" for i, n in enumerate(names) if i % 10]
    linked = sorted(p.name for p in train.iterdir() if p.suffix == ".jpg")
    assert linked == [n for i, n in enumerate(names) if i % 10]
    (held / "labels.txt").unlink()  # a split made before labels were split gets them
    (train / names[3]).unlink()  # as if killed while linking
    ev.distill_split()
    assert (held / "labels.txt").read_text().split("\n")[:-1] == lines[held]
    assert sorted(p.name for p in train.iterdir() if p.suffix == ".jpg") == linked

"""The papers' experiments in miniature; each writes ``docs/results/NAME.json`` (+ a plot).

python -m research.paper mismatch|gap|gains|ablations|evit|pyra|segmentation \
    [--budget small] [--out docs/results]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from research.paper.common import GENERATED, MODEL, Lab, write_results
from research.paper.segmentation import segmentation
from tocom.finetuned import load_model
from tocom.report.plots import accuracy_plot

TASKS = ("cifar10", *GENERATED)
EVEN = list(range(0, 17, 2))


def mismatch(lab: Lab, out: Path) -> dict:
    """Paper Fig. 2: models fine-tuned at r = 0 and r = 16, evaluated at r = 0, 2, ..., 16."""
    results = {}
    for task in TASKS:
        curves = {}
        for source in (0, 16):
            rows = lab.evaluate(lab.finetuned(task, source), task, EVEN, source)
            curves[f"fine-tuned at r={source}"] = [(r.target, r.accuracy) for r in rows]
        results[task] = {label: dict(points) for label, points in curves.items()}
        accuracy_plot(
            curves, out / f"mismatch_{task}.png", title=f"{MODEL} on {task}: source vs target degree"
        )
    return {"accuracy": results}


def _random_like(delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian direction with the norm of ``delta`` (the control for a transferred gap)."""
    direction = torch.randn(delta.shape, generator=generator, dtype=torch.float64)
    return (direction * (delta.double().norm() / direction.norm().clamp_min(1e-12))).to(delta.dtype)


def gap(lab: Lab, out: Path) -> dict:
    """Paper Table 1: does (M16 - M0) of task A, added to M0 of task B, help B at r = 16?

    Control: the same M0 of B moved by a random direction of equal norm, tensor by tensor, so a
    change that any perturbation of that size would cause is not read as the gap's effect.
    """
    table = []
    generator = torch.Generator().manual_seed(0)
    for a in TASKS:
        for b in TASKS:
            if a == b:
                continue
            m0a, m16a, m0b = (
                load_model(MODEL, lab.finetuned(t, s)).state_dict() for t, s in ((a, 0), (a, 16), (b, 0))
            )
            transferred = {
                k: v + (m16a[k] - m0a[k]) if not k.startswith("head") else v for k, v in m0b.items()
            }
            plain = lab.evaluate(lab.finetuned(b, 0), b, [16], 0)[0].accuracy
            moved = lab.evaluate(
                lab.finetuned(b, 0), b, [16], 0, weights=(f"M0[{b}] + M16[{a}] - M0[{a}]", transferred)
            )[0].accuracy
            control = {
                k: v + _random_like(m16a[k] - m0a[k], generator)
                if not k.startswith("head") and v.is_floating_point() else v
                for k, v in m0b.items()
            }
            shaken = lab.evaluate(
                lab.finetuned(b, 0), b, [16], 0, weights=(f"M0[{b}] + random(|M16[{a}] - M0[{a}]|)", control)
            )[0].accuracy
            table.append(
                {"from": a, "to": b, "M0_at_16": plain, "M0_plus_gap_at_16": moved, "gain": moved - plain,
                 "M0_plus_random_at_16": shaken, "random_gain": shaken - plain}
            )
    return {"rows": table}


def gains(lab: Lab, out: Path) -> dict:
    """Paper Fig. 5/6, Tables 2-4: sources 0 and 4 to 8, 12, 16; source 16 to 0, 4, 8, 12."""
    plugin = lab.plugin()
    rows = []
    for task in TASKS:
        for source, targets in ((0, [8, 12, 16]), (4, [8, 12, 16]), (16, [0, 4, 8, 12])):
            rows += lab.with_plugin(lab.finetuned(task, source), task, source, targets, plugin)
    for task in TASKS:
        curves = {"without plugin": [], "with ToCom": []}
        for row in rows:
            if row["task"] == task and row["source"] == 0:
                curves["without plugin"].append((row["target"], row["without"]))
                curves["with ToCom"].append((row["target"], row["with"]))
        accuracy_plot(curves, out / f"gains_{task}_source0.png", title=f"{task}: fine-tuned at r=0")
    return {"plugin": str(plugin), "rows": rows}


def ablations(lab: Lab, out: Path) -> dict:
    """Paper Table 5: shared groups, classification loss, no inversion, against the standard plugin,
    all distilled with the same (ablation) budget, on CIFAR-10 sources 0 -> 16 and 16 -> 0."""
    variants = {
        "standard": ("standard", "kd"),
        "shared": ("shared", "kd"),
        "classification loss": ("standard", "ce"),
        "no inversion": ("no_inversion", "kd"),
    }
    rows = []
    for name, (variant, loss) in variants.items():
        plugin = lab.plugin(variant, loss, steps=lab.budget.ablation_steps)
        for source, target in ((0, 16), (16, 0), (4, 12)):
            row = lab.with_plugin(lab.finetuned("cifar10", source), "cifar10", source, [target], plugin)[0]
            rows.append({"variant": name, **row})
    return {"steps": lab.budget.ablation_steps, "rows": rows}


def evit(lab: Lab, out: Path) -> dict:
    """Paper Table 8: EViT pruning instead of ToMe (a model fine-tuned at 0 is the same for both)."""
    plugin = lab.plugin(method="evit", steps=lab.budget.ablation_steps)
    rows = []
    for task in ("cifar10",):
        rows += lab.with_plugin(lab.finetuned(task, 0), task, 0, [4, 8, 12, 16], plugin, method="evit")
    return {"plugin": str(plugin), "rows": rows}


def pyra(lab: Lab, out: Path) -> dict:
    """PYRA Tables 2-3: PYRA against ToMe + LoRA at the low and high schedules, LoRA uncompressed.

    Each model is evaluated at the schedule it was fine-tuned at."""
    rows = []
    for method, text in (("lora", "0"), ("lora", "low"), ("pyra", "low"), ("lora", "high"), ("pyra", "high")):
        model_file = lab.finetuned("cifar10", text, method)
        schedule = load_model(MODEL, model_file).effective_schedule()
        row = lab.evaluate(model_file, "cifar10", [schedule], 0)[0]
        rows.append(
            {
                "method": method,
                "schedule": text,
                "per_block_r": schedule,
                "accuracy": row.accuracy,
                "throughput": row.throughput,
            }
        )
    return {"rows": rows}


EXPERIMENTS: dict[str, Callable[[Lab, Path], dict]] = {
    "mismatch": mismatch,
    "gap": gap,
    "gains": gains,
    "ablations": ablations,
    "evit": evit,
    "pyra": pyra,
    "segmentation": segmentation,
}


def run_experiment(
    name: str,
    out: str | Path = "docs/results",
    budget: str = "small",
    work: str | Path = "runs/experiments",
    progress: bool = True,
    shared: str | Path | None = None,
    plugin: str | Path | None = None,
) -> Path:
    """Run one experiment (resuming from the cache) and write its results file."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    started = time.time()
    lab = Lab(work, budget, progress, shared=shared, plugin=plugin)
    out = Path(out)
    results = EXPERIMENTS[name](lab, out)
    return write_results(name, {"budget": budget, **results}, out, started)

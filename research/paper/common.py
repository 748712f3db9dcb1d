"""Shared set-up of the miniature experiments: real DeiT-Tiny, real data, cached models and evals.

Every expensive product (a fine-tuned model, a distilled plugin, an evaluation) is cached under
``work/`` by a name that spells out what it is, so experiments share them and an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Subset

from research.paper.keys import MODEL, shared_weights
from tocom.atomic import atomic_write_text
from tocom.compensator import Compensator
from tocom.data import load_dataset, write_vtab
from tocom.finetuned import eval_transform_for, load_model
from tocom.jobs.distill import DistillConfig, run_distill
from tocom.jobs.evaluate import EvalRow, make_loader, sweep, sweep_at_selected_scales
from tocom.jobs.finetune import FinetuneConfig, run_finetune
from tocom.models import patch
from tocom.report.provenance import provenance

GENERATED = ("count", "orientation")
SCALES = (0.05, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class Budget:
    """How much compute a run spends; ``small`` fits a 2-core CPU."""

    finetune_epochs: int = 5
    eval_images: int = 500
    ablation_steps: int = 150


BUDGETS = {"small": Budget(), "smoke": Budget(finetune_epochs=1, eval_images=40, ablation_steps=4)}


class Lab:
    """Paths, caches and the few operations every experiment needs."""

    def __init__(self, work: str | Path = "runs/experiments", budget: str = "small", progress: bool = True,
                 shared: str | Path | None = None, plugin: str | Path | None = None):
        """``shared``: the real weights and data (default ``$TOCOM_SHARED``); ``plugin``: the plugin to
        use for the default distillation settings, else one is distilled at the budget."""
        self.shared, self.weights = shared_weights(shared, "the experiments need")
        self.shipped_plugin = Path(plugin) if plugin is not None else None
        self.work = Path(work)
        self.budget = BUDGETS[budget]
        self.budget_name = budget
        self.progress = progress
        self.evals_file = self.work / f"evals-{budget}.json"
        self._evals = read_cache(self.evals_file)

    # ----- data -------------------------------------------------------------------------
    def task_dir(self, task: str) -> Path:
        """CIFAR-10 (real, VTAB-1k format) or a generated structured task written in that format."""
        if task == "cifar10":
            return self.shared / "data/vtab-1k/cifar10"
        folder = self.work / "data" / task
        if not (folder / "test.txt").is_file():
            write_vtab(
                task,
                folder,
                seed=GENERATED.index(task) + 1,
                image_size=64,
                n_train=800,
                n_val=200,
                n_test=1000,
                overwrite=True,
            )
        return folder

    @property
    def pretraining_images(self) -> Path:
        return self.shared / "data/imagenet-sample"

    # ----- models and plugins -------------------------------------------------------------
    def finetuned(self, task: str, source: int | str = 0, method: str = "full") -> Path:
        """A DeiT-Tiny fine-tuned on ``task`` at schedule ``source`` (cached)."""
        tag = str(source).replace(",", "-")
        out = self.work / "models" / self.budget_name / f"{task}_{method}_r{tag}.safetensors"
        if not out.is_file():
            run_finetune(FinetuneConfig(
                MODEL,
                self.task_dir(task),
                checkpoint=self.weights,
                method=method,
                r=str(source),
                epochs=self.budget.finetune_epochs,
                out=out,
                run_dir=str(out) + ".run",
                resume=(Path(str(out) + ".run") / "last.ckpt").is_file(),
                progress=self.progress,
            ))
        return out

    def plugin(
        self, variant: str = "standard", loss: str = "kd", method: str = "tome", steps: int | None = None
    ) -> Path:
        """The given plugin for the default settings, else a plugin distilled with the ablation budget."""
        shipped = self.shipped_plugin
        default = (variant, loss, method, steps) == ("standard", "kd", "tome", None)
        if default and shipped is not None and shipped.is_file():
            return shipped
        steps = steps or self.budget.ablation_steps
        out = (
            self.work / "plugins" / self.budget_name / f"{method}_{variant}_{loss}_{steps}.tocom.safetensors"
        )
        if not out.is_file():
            run_dir = Path(str(out) + ".run")
            run_distill(DistillConfig(
                MODEL,
                self.pretraining_images,
                checkpoint=self.weights,
                method=method,
                variant=variant,
                loss=loss,
                steps=steps,
                batch_size=32,
                lr=1e-3,
                out=out,
                run_dir=run_dir,
                resume=(run_dir / "last.ckpt").is_file(),
                progress=self.progress,
            ))
        return out

    # ----- evaluation ---------------------------------------------------------------------
    def evaluate(
        self,
        model_file: Path,
        task: str,
        targets: list[int],
        source: int,
        *,
        plugin: Path | None = None,
        scales: tuple[float, ...] | None = None,
        split: str = "test",
        method: str = "tome",
        weights: tuple[str, dict] | None = None,
    ) -> list[EvalRow]:
        """Rows of :func:`tocom.jobs.evaluate.sweep`, cached by everything that defines them."""
        key = json.dumps(
            [
                str(model_file),
                task,
                targets,
                source,
                str(plugin),
                scales,
                split,
                method,
                self.budget.eval_images if split == "test" else "all",
                weights[0] if weights else None,
            ]
        )
        if key in self._evals:
            return [EvalRow(**row) for row in self._evals[key]]
        model = patch(load_model(MODEL, model_file), method)
        if weights is not None:
            model.load_state_dict(weights[1])  # weights[0] names them in the cache key
        data = load_dataset(self.task_dir(task), split, eval_transform_for(model_file, model))
        if split == "test" and len(data) > self.budget.eval_images:
            step = len(data) // self.budget.eval_images
            data = Subset(data, range(0, step * self.budget.eval_images, step))
        rows = sweep(
            model,
            make_loader(data, 50),
            targets,
            source,
            Compensator.load(plugin) if plugin else None,
            scales,
            split=split,
            progress=self.progress,
        )
        self._evals[key] = [row.as_dict() for row in rows]
        atomic_write_text(self.evals_file, json.dumps(self._evals, indent=1))
        return rows

    def with_plugin(
        self, model_file: Path, task: str, source: int, targets: list[int], plugin: Path, method: str = "tome"
    ) -> list[dict]:
        """Per target: accuracy without the plugin and with it at the scale chosen on val200."""

        def run(split: str, scales, targets) -> list[EvalRow]:
            return self.evaluate(model_file, task, list(targets), source, plugin=plugin, scales=tuple(scales),
                                 split=split, method=method)

        rows = sweep_at_selected_scales(run, SCALES, targets)
        out = []
        for t in targets:
            base = next(r for r in rows if r.target == t and not r.plugin)
            comp = next(r for r in rows if r.target == t and r.plugin)
            out.append({"task": task, "source": source, "target": t, "without": base.accuracy,
                        "with": comp.accuracy, "gain": comp.accuracy - base.accuracy, "scale": comp.scale})
        return out


def read_cache(path: Path) -> dict:
    """A JSON cache of evaluations ({} when absent); a damaged one is named, to be deleted."""
    if not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text())
    except ValueError:
        cache = None
    if not isinstance(cache, dict):
        raise ValueError(f"{path} is not a JSON object; the cache is damaged, delete it and rerun "
                         "(its evaluations are redone)")
    return cache


def write_results(name: str, results: dict, out_dir: str | Path, started: float) -> Path:
    """``out_dir/NAME.json`` (with the wall time of the whole command) and ``NAME.md``."""
    from research.paper.render import render

    out = Path(out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"experiment": name, "wall_s": round(time.time() - started, 1), "provenance": provenance(),
               **results}
    atomic_write_text(out, json.dumps(results, indent=2))
    atomic_write_text(out.with_suffix(".md"), render(name, results))
    return out

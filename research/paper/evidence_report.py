"""The ``analyze`` stage of the evidence run: endpoints with paired CIs, tables, predictions on disk.

The endpoints are the ones declared in ``docs/results/README.md`` before the run:

1. the plugin's gain at 0 -> 16 (scale picked on val200), pooled over tasks, fine-tuning seeds and
   plugin seeds;
2. the same at 16 -> 0;
3. the mismatch gap at 16 (the model fine-tuned at 16 against the one fine-tuned at 0, both run
   at 16) and the fraction of it the plugin closes;
4. PYRA against ToMe + LoRA at the ``high`` schedule (the ``pyra`` stage; the modulator learning
   rate picked per task on val200).

The candidate-cause variants of the plugin (the ``variants`` stage) are reported beside the
endpoints: each variant's gain and fraction of the gap closed, and its difference from the
standard plugin of the same seed on the same models, next to the difference between two seeds of
the standard plugin (how far two plugins differ by chance alone).

Every (source, target) pair also gets its pooled gain, at the selected and at the fixed scale,
with a flag where the plugin loses significantly (CI entirely below 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as sps

from tocom.atomic import atomic_write_text
from tocom.report.compare import comparison_table
from tocom.report.plots import accuracy_plot
from tocom.report.provenance import provenance
from tocom.report.records import Records, write_records
from tocom.report.stats import PairedDifference, correctness, pooled_difference, two_stage_means

if TYPE_CHECKING:  # the type only: evidence imports this module to run its analysis
    from research.paper.evidence import Evidence


def _test_row(record: dict, plugin_seed: str, target: int, scale: float | None) -> dict:
    for row in record["plugins"][plugin_seed]["test"]:
        if row["target"] == target and row["scale"] == scale and row["plugin"] == (scale is not None):
            return row
    raise KeyError(f"{record['model']}: no test row for target {target}, scale {scale}")


class Analysis:
    """Correctness arrays of the evidence records, grouped the way the endpoints need them."""

    def __init__(self, ev: Evidence, records: list[dict]):
        self.ev, self.p = ev, ev.p
        self.by_unit = {(r["task"], r["source"], r["seed"]): r for r in records}

    def _runs(self, task: str, source: int, target: int, kind: str, per_plugin: bool = True) -> np.ndarray:
        """``(model seeds x plugin seeds, N)`` correctness; ``kind``: without | selected | fixed.

        Without a plugin the rows repeat per plugin seed (to pair with the plugin rows), unless
        ``per_plugin`` is False: then one row per model seed.
        """
        rows = []
        plugin_seeds = self.p.plugin_seeds if per_plugin else self.p.plugin_seeds[:1]
        for seed in self.p.finetune_seeds:
            record = self.by_unit[(task, source, seed)]
            for plugin_seed in map(str, plugin_seeds):
                scale = {"without": None, "fixed": self.p.fixed_scale,
                         "selected": record["plugins"][plugin_seed]["selected"].get(str(target))}[kind]
                row = _test_row(record, plugin_seed, target, scale)
                rows.append(correctness(row["predictions"], row["labels"], record["model"]))
        return np.stack(rows)

    def gain(self, source: int, target: int, kind: str = "selected",
             tasks: tuple[str, ...] | None = None) -> PairedDifference:
        return pooled_difference([(self._runs(t, source, target, "without"),
                                   self._runs(t, source, target, kind)) for t in tasks or self.p.tasks])

    def accuracy(self, source: int, target: int, kind: str) -> float:
        """Mean top-1 over tasks, seeds and images (tasks weighted by their test images)."""
        cells = [self._runs(t, source, target, kind).ravel() for t in self.p.tasks]
        return float(np.concatenate(cells).mean())

    def gap(self, source: int, target: int, tasks: tuple[str, ...] | None = None) -> PairedDifference:
        """The model fine-tuned at ``target`` against the one fine-tuned at ``source``, both at ``target``."""
        return pooled_difference([(self._runs(t, source, target, "without", per_plugin=False),
                                   self._runs(t, target, target, "without", per_plugin=False))
                                  for t in tasks or self.p.tasks])

    def closure(self, source: int, target: int, kind: str = "selected") -> dict:
        """Fraction of the gap the plugin closes, with two paired percentile bootstrap intervals.

        ``kind``: the plugin's scale, ``selected`` on val (the endpoint) or ``fixed``.

        ``ci_low``/``ci_high`` (the scheme of the first report): (run, image) cells of all tasks
        resampled together (scipy), which ignores that cells share runs, so it is too narrow.
        ``seeds_ci_low``/``seeds_ci_high``: two-stage, runs then images per task, as the gain's own
        interval (:func:`~tocom.report.stats.two_stage_means`); a run pairs a source model, a plugin
        and a matched-degree model of one seed index. Replicates whose gap is not positive have no
        fraction to take; their share is reported (``seeds_no_gap``) and they count as 0 closed.
        """
        strata = [(self._runs(t, source, target, "without"), self._runs(t, source, target, kind),
                   self._runs(t, target, target, "without"))  # matched rows line up with plug
                  for t in self.p.tasks]
        base, plug, matched = (np.concatenate([s[i].ravel() for s in strata]).astype(float) for i in range(3))

        def fraction(b, p, m, axis=-1):
            gap = m.mean(axis) - b.mean(axis)
            return np.where(gap != 0, (p.mean(axis) - b.mean(axis)) / np.where(gap != 0, gap, 1), np.nan)

        point = float(fraction(base, plug, matched))
        if np.isnan(point):  # no gap to close: the fraction is undefined, not a number to resample
            return {"fraction": None, "ci_low": None, "ci_high": None, "scheme": "no gap"}
        ci = sps.bootstrap((base, plug, matched), fraction, paired=True, vectorized=True, n_resamples=5000,
                           method="percentile", rng=np.random.default_rng(0)).confidence_interval
        means = two_stage_means(strata, n_resamples=5000)
        gain, gap = means[:, 1] - means[:, 0], means[:, 2] - means[:, 0]
        fractions = np.where(gap > 0, gain / np.where(gap > 0, gap, 1), 0.0)
        seeds_low, seeds_high = np.quantile(fractions, [0.025, 0.975])
        return {"fraction": point, "ci_low": float(ci.low), "ci_high": float(ci.high),
                "scheme": "cells (run x image) resampled together, pooled over tasks",
                "seeds_ci_low": float(seeds_low), "seeds_ci_high": float(seeds_high),
                "seeds_no_gap": float(np.mean(gap <= 0)),
                "seeds_scheme": "two-stage: runs, then images, per task; mean over tasks"}

    def records(self, task: str) -> Records:
        """Every test prediction of one task, one row per (model seed, source, plugin seed, target, scale)."""
        runs, labels = [], None
        for source in self.p.sources:
            for seed in self.p.finetune_seeds:
                record = self.by_unit[(task, source, seed)]
                for plugin_seed, entry in record["plugins"].items():
                    for row in entry["test"]:
                        if not row["plugin"] and plugin_seed != str(self.p.plugin_seeds[0]):
                            continue  # the same model without a plugin, evaluated once per plugin
                        labels = row["labels"]
                        config = {"task": task, "source": source, "seed": seed, "target": row["target"],
                                  "plugin_seed": int(plugin_seed) if row["plugin"] else None,
                                  "scale": row["scale"],
                                  "selected": row["plugin"] and entry["selected"].get(str(row["target"]))
                                  == row["scale"]}
                        runs.append((config, row["predictions"]))
        return Records.from_runs(np.arange(len(labels)), labels, runs, source=f"evidence/{task}")


def _analysis(ev: Evidence, records: list[dict], seeds: tuple[int, ...],
              plugin_seeds: tuple[int, ...]) -> Analysis:
    protocol = replace(ev.p, finetune_seeds=seeds, plugin_seeds=plugin_seeds)
    return Analysis(SimpleNamespace(p=protocol), records)


def variant_results(ev: Evidence, records: list[dict], seeds: tuple[int, ...]) -> dict:
    """Per variant (and the ``reference`` standard plugin), on the models of the records that exist:
    gains at both endpoints, the fraction of the 0 -> 16 gap closed, and the difference from the
    reference; ``{"not run": [...]}`` lists variants without every record."""
    lo, hi = min(ev.p.sources), max(ev.p.sources)
    standard = {(r["task"], r["source"], r["seed"]): r for r in records}
    loaded: dict[str, list[dict]] = {}
    missing = []
    for variant in ev.variant_records():
        paths = [ev.predictions_path(ev.model_path(*u), variant) for u in ev.models(seeds)]
        if not all(path.is_file() for path in paths):
            missing.append(variant)
            continue
        merged = []
        for path in paths:
            record = json.loads(path.read_text())
            base = standard[(record["task"], record["source"], record["seed"])]
            # The matched-degree rows (each model at its own degree, without a plugin) come from the
            # standard records: variant records hold the endpoint's target alone.
            own = [row for row in next(iter(base["plugins"].values()))["test"]
                   if not row["plugin"] and row["target"] == record["source"]]
            merged.append({**record, "plugins": {k: {**e, "test": e["test"] + own}
                                                 for k, e in record["plugins"].items()}})
        loaded[variant] = merged
    out: dict = {"not run": missing, "variants": {}}
    if "reference" not in loaded:
        return out
    vs = ev.p.variant_seeds
    reference = _analysis(ev, loaded["reference"], seeds, vs)
    for variant, merged in loaded.items():
        an = _analysis(ev, merged, seeds, vs)
        row: dict = {"closure": an.closure(lo, hi)}
        for s, t in ((lo, hi), (hi, lo)):
            row[f"gain {s}->{t}"] = an.gain(s, t).as_dict()
            row[f"vs reference {s}->{t}"] = pooled_difference(
                [(reference._runs(task, s, t, "selected"), an._runs(task, s, t, "selected"))
                 for task in ev.p.tasks]).as_dict()
        kind = "standard" if variant == "reference" else variant
        summary = Path(str(ev.plugin_path(vs[0], kind)) + ".json")
        if summary.is_file():
            info = json.loads(summary.read_text())
            row["distillation"] = {k: info.get(k) for k in ("loss", "augment", "steps", "batch_size", "lr")}
            row["holdout_curve"] = info.get("holdout_curve")
        out["variants"][variant] = row
    if len(ev.p.plugin_seeds) > 1:  # two seeds of the standard plugin: a difference by chance alone
        a, b = (_analysis(ev, records, seeds, (k,)) for k in ev.p.plugin_seeds[:2])
        out["standard seed vs seed"] = {
            f"{s}->{t}": pooled_difference([(a._runs(task, s, t, "selected"), b._runs(task, s, t, "selected"))
                                            for task in ev.p.tasks]).as_dict()
            for s, t in ((lo, hi), (hi, lo))}
    return out


def pyra_records(ev: Evidence, seeds: tuple[int, ...]) -> tuple[dict[tuple, dict], tuple[int, ...]]:
    """The ``pyra`` stage's records of the seeds that have every unit, keyed by
    (task, seed, method, modulator lr), and those seeds: a run stopped early is analysed on its
    whole seeds, as the other endpoints are."""
    records: dict[tuple, dict] = {}
    complete = []
    for seed in seeds:
        paths = {(task, seed, *arm): ev._pyra_record(ev.pyra_path(task, seed, *arm))
                 for task in ev.p.tasks for arm in ev.pyra_arms()}
        if all(path.is_file() for path in paths.values()):
            records.update({key: json.loads(path.read_text()) for key, path in paths.items()})
            complete.append(seed)
    return records, tuple(complete)


def pyra_results(ev: Evidence, records: dict[tuple, dict], seeds: tuple[int, ...]) -> dict:
    """Endpoint 4: PYRA (modulator lr picked per task on the mean val200 accuracy over seeds) minus
    ToMe + LoRA at the ``high`` schedule, pooled over tasks and seeds; every arm beside it.
    ``records, seeds``: what :func:`pyra_records` gives."""
    arms = ev.pyra_arms()
    if not seeds:
        return {"not run": "no seed has every PYRA and LoRA unit: run the pyra stage"}

    def runs(task: str, method: str, lr: float | None) -> np.ndarray:
        rows = [records[(task, seed, method, lr)] for seed in seeds]
        return np.stack([correctness(r["test"]["predictions"], r["test"]["labels"], r["model"])
                         for r in rows])

    val_acc = {(t, m, lr): float(np.mean([_or_nan(records[(t, s, m, lr)].get("val_acc")) for s in seeds]))
               for t in ev.p.tasks for m, lr in arms}
    pyra_lrs = [lr for method, lr in arms if method == "pyra"]
    # ties: the smaller rate
    chosen = {t: max(pyra_lrs, key=lambda lr: (val_acc[(t, "pyra", lr)], -lr)) for t in ev.p.tasks}
    lora = {t: runs(t, "lora", None) for t in ev.p.tasks}
    picked = {t: runs(t, "pyra", chosen[t]) for t in ev.p.tasks}
    endpoint = pooled_difference([(lora[t], picked[t]) for t in ev.p.tasks])
    per_arm = {f"pyra, modulator lr {lr:g}": pooled_difference([(lora[t], runs(t, "pyra", lr))
                                                                for t in ev.p.tasks]).as_dict()
               for lr in pyra_lrs}
    per_task = {t: pooled_difference([(lora[t], picked[t])]).as_dict() for t in ev.p.tasks}
    val_acc = {f"{t} {m}{'' if lr is None else f' mlr {lr:g}'}": v for (t, m, lr), v in val_acc.items()}
    return {"schedule": ev.p.pyra_schedule, "modulator_lr_chosen": chosen, "endpoint": endpoint.as_dict(),
            "per_arm": per_arm, "per_task": per_task, "val_acc": val_acc,
            "mean_val_curves": pyra_curves(ev, records), "seeds": list(seeds)}


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def pyra_curves(ev: Evidence, records: dict[tuple, dict]) -> dict[str, list[tuple[int, float]]]:
    """Per arm, the val200 accuracy against the training step, mean over tasks and seeds, at the
    steps every unit of the arm evaluated (units of one protocol share them); arms without
    curves are left out."""
    curves = {}
    for method, lr in ev.pyra_arms():
        arm = [dict(map(tuple, r["curve"])) for (_, _, m, rate), r in records.items()
               if (m, rate) == (method, lr) and r.get("curve")]
        steps = sorted(set.intersection(*(set(c) for c in arm))) if arm else []
        if steps:
            curves[_arm_label(method, lr)] = [(s, float(np.mean([c[s] for c in arm]))) for s in steps]
    return curves


def _arm_label(method: str, lr: float | None) -> str:
    return "ToMe + LoRA" if method == "lora" else f"PYRA, modulator lr {lr:g}"


def write_pyra_outputs(ev: Evidence, records: dict[tuple, dict], curves: dict[str, list[tuple[int, float]]],
                       out: Path) -> list[str]:
    """``evidence-pyra-{task}.predictions.npz`` (one row per (seed, method, modulator lr), run at
    the schedule it was fine-tuned at) and ``evidence-pyra.png`` of ``curves`` (what
    :func:`pyra_curves` gives; no plot when empty); returns the file names written."""
    files = []
    for task in ev.p.tasks:
        runs, labels = [], None
        for (t, seed, method, lr), record in sorted(records.items(), key=lambda kv: str(kv[0])):
            if t == task:
                labels = record["test"]["labels"]
                runs.append(({"task": task, "seed": seed, "method": method, "modulator_lr": lr,
                              "schedule": record.get("schedule")}, record["test"]["predictions"]))
        if runs:
            path = out / f"evidence-pyra-{task}.predictions.npz"
            write_records(path, Records.from_runs(np.arange(len(labels)), labels, runs,
                                                  source=f"evidence/pyra/{task}"))
            files.append(path.name)
    if curves:
        accuracy_plot(curves, out / "evidence-pyra.png", f"val200 while fine-tuning at {ev.p.pyra_schedule}, "
                      "mean over tasks and seeds", xlabel="training step")
        files.append("evidence-pyra.png")
    return files


def analyze(ev: Evidence, out: Path) -> dict:
    """Compute the endpoints and tables; write ``evidence.json``, ``evidence.md`` and the predictions."""
    records, seeds = ev.load_predictions()
    an = Analysis(SimpleNamespace(p=replace(ev.p, finetune_seeds=seeds)), records)
    lo, hi = min(ev.p.sources), max(ev.p.sources)
    endpoints = {
        f"gain {lo}->{hi}": an.gain(lo, hi),
        f"gain {hi}->{lo}": an.gain(hi, lo),
        f"mismatch gap at {hi}": an.gap(lo, hi),
        f"mismatch gap at {lo}": an.gap(hi, lo),
    }
    # the endpoint (scale selected on val), then the fixed-scale row beside it
    kinds = (("selected", ""), ("fixed", " (fixed s)"))
    closure = {f"{s}->{t}{label}": an.closure(s, t, kind)
               for kind, label in kinds for s, t in ((lo, hi), (hi, lo))}
    pairs = []
    for source in ev.p.sources:
        for target in ev.p.targets:
            if target == source:
                continue
            for kind in ("selected", "fixed"):
                d = an.gain(source, target, kind)
                pairs.append({"source": source, "target": target, "scale": kind, **d.as_dict(),
                              "significant_loss": d.ci_high < 0})
    per_task = [{"task": task, "source": s, "target": t, **an.gain(s, t, tasks=(task,)).as_dict(),
                 "gap": an.gap(s, t, tasks=(task,)).as_dict()}
                for task in ev.p.tasks for s, t in ((lo, hi), (hi, lo))]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for task in ev.p.tasks:
        path = out / f"evidence-{task}.predictions.npz"
        write_records(path, an.records(task))
        files.append(path.name)
    curves = {"finetune": {}, "plugins": {}}
    for record in records:
        curves["finetune"][f"{record['task']}_r{record['source']}_seed{record['seed']}"] = record.get("curve")
    for seed in ev.p.plugin_seeds:
        summary = Path(str(ev.plugin_path(seed)) + ".json")
        curves["plugins"][f"seed{seed}"] = json.loads(summary.read_text()).get("holdout_curve")
    _plots(an, ev, curves["plugins"], out)
    variants = variant_results(ev, records, seeds)
    pyra_units, pyra_seeds = pyra_records(ev, seeds)
    pyra = pyra_results(ev, pyra_units, pyra_seeds)
    files += write_pyra_outputs(ev, pyra_units, pyra.get("mean_val_curves", {}), out)
    curves["pyra"] = {f"{t}_{m}{'' if lr is None else f'-mlr{lr:g}'}_seed{seed}": r.get("curve")
                      for (t, seed, m, lr), r in pyra_units.items()}
    ran_on = [r.get("ran_on") for r in records] + [r.get("ran_on") for r in pyra_units.values()]
    results = {
        "experiment": "evidence", "provenance": {**provenance(ev.device), **ev.provenance(),
                                                 "units_ran_on": _distinct(ran_on)},
        "endpoints": {k: v.as_dict() for k, v in endpoints.items()},
        "gap_closed": closure,
        "pyra_vs_tome_lora_high": pyra,
        "variants": variants,
        "finetune_seeds_analysed": list(seeds),
        "complete": tuple(seeds) == tuple(ev.p.finetune_seeds),
        "pairs": pairs, "per_task": per_task, "curves": curves, "predictions": files,
        "comparisons": [
            {"name": f"plugin at {s}->{t} (selected scale)",
             "a": {"source": s, "target": t, "plugin_seed": None},
             "b": {"source": s, "target": t, "selected": True}, "pair_on": ["task", "seed"]}
            for s, t in ((lo, hi), (hi, lo))],
    }
    atomic_write_text(out / "evidence.json", json.dumps(results, indent=1, default=str))
    atomic_write_text(out / "evidence.md", render(endpoints, closure, pairs, an.p, ev.p, per_task)
                      + render_extra(variants, pyra))
    return results


def _plots(an: Analysis, ev: Evidence, holdout_curves: dict, out: Path) -> None:
    """``evidence.png``: pooled accuracy against the target degree, per source, with and without the
    plugin; ``evidence-holdout.png``: each plugin's held-out distillation loss per degree pair
    (``holdout_curves``: ``{"seed0": [{"step", "loss_0_to_16", ...}, ...]}``)."""
    curves = {}
    for source in ev.p.sources:
        for kind, label in (("without", "no plugin"), ("selected", "plugin, s on val")):
            curves[f"fine-tuned at {source}, {label}"] = [(t, an.accuracy(source, t, kind))
                                                          for t in ev.p.targets]
    accuracy_plot(curves, out / "evidence.png", "pooled over tasks and seeds (DeiT-Tiny, AdaptFormer)")
    losses = {}
    for seed, curve in holdout_curves.items():
        for point in curve or []:
            for key, value in point.items():
                if key.startswith("loss_"):
                    pair = key[len("loss_"):].replace("_to_", "->")
                    losses.setdefault(f"{pair}, {seed}", []).append((point["step"], value))
    if losses:
        accuracy_plot(losses, out / "evidence-holdout.png", "plugin distillation loss on held-out images",
                      xlabel="distillation step", ylabel="KL(teacher at src || student at tgt)")


def _distinct(items) -> list:
    """The distinct non-None items, in first-seen order (dicts compared by value)."""
    seen: dict[str, object] = {}
    for item in items:
        if item is not None:
            seen.setdefault(json.dumps(item, sort_keys=True, default=str), item)
    return list(seen.values())


def render(endpoints: dict[str, PairedDifference], closure: dict, pairs: list[dict], p, declared,
           per_task: list[dict] = ()) -> str:
    """Markdown of the results; ``p`` is the protocol as analysed, ``declared`` as planned."""
    partial = ([f"**Partial run**: {len(p.finetune_seeds)} of the {len(declared.finetune_seeds)} declared "
                "fine-tuning seeds finished; the rest is not analysed.", ""]
               if p.finetune_seeds != declared.finetune_seeds else [])
    lines = [
        "# Evidence: the plugin under the ToCom VTAB protocol (generated by `python -m research.paper all`)",
        "",
        f"DeiT-Tiny, {p.method} on the frozen backbone ({p.epochs} epochs), tasks {', '.join(p.tasks)}; "
        f"{len(p.finetune_seeds)} fine-tuning seeds x {len(p.plugin_seeds)} plugin seeds "
        f"({p.plugin_steps} distillation steps each); test sets in full. Differences are in points "
        "with paired bootstrap 95% CIs (seeds and images resampled); McNemar p per run.",
        "",
        *partial,
        "## Pre-declared endpoints",
        "",
        comparison_table(list(endpoints.items())),
        "",
        "| gap closed by the plugin | fraction | 95% CI, cells | 95% CI, seeds then images |",
        "|---|---|---|---|",
        *[f"| {k} | {v['fraction']:.2f} | [{v['ci_low']:.2f}, {v['ci_high']:.2f}] "
          f"| [{v['seeds_ci_low']:.2f}, {v['seeds_ci_high']:.2f}] |"
          if v["fraction"] is not None else f"| {k} | no gap | - | - |" for k, v in closure.items()],
        "",
        "The cells interval resamples (run, image) cells together and is too narrow; the seeds "
        "interval resamples runs, then images, per task, as the gains' intervals do.",
        "",
        "## Every (source, target) pair, pooled over tasks",
        "",
        "| source | target | scale | without (%) | with (%) | gain (points) [95% CI] | significant loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in pairs:
        lines.append(f"| {row['source']} | {row['target']} | {row['scale']} | "
                     f"{100 * row['accuracy_a']:.1f} | {100 * row['accuracy_b']:.1f} | "
                     f"{100 * row['difference']:+.2f} "
                     f"[{100 * row['ci_low']:+.2f}, {100 * row['ci_high']:+.2f}] | "
                     f"{'yes' if row['significant_loss'] else 'no'} |")
    if per_task:
        lines += ["", "## Subgroups (secondary): per task, scale picked on val", "",
                  "| task | source -> target | without (%) | with (%) | gain (points) [95% CI] "
                  "| matched-degree model (%) | mismatch gap (points) [95% CI] |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['task']} | {row['source']} -> {row['target']} | {100 * row['accuracy_a']:.1f} | "
                  f"{100 * row['accuracy_b']:.1f} | {100 * row['difference']:+.2f} "
                  f"[{100 * row['ci_low']:+.2f}, {100 * row['ci_high']:+.2f}] | "
                  f"{100 * row['gap']['accuracy_b']:.1f} | {100 * row['gap']['difference']:+.2f} "
                  f"[{100 * row['gap']['ci_low']:+.2f}, {100 * row['gap']['ci_high']:+.2f}] |"
                  for row in per_task]
    lines += ["", "![accuracy against the target degree](evidence.png)", "",
              "![held-out distillation loss](evidence-holdout.png)"]
    return "\n".join(lines) + "\n"


def _ci(d: dict) -> str:
    return f"{100 * d['difference']:+.2f} [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"


def render_extra(variants: dict, pyra: dict) -> str:
    """Markdown of the candidate-cause variants and of the PYRA endpoint."""
    lines = ["", "## Candidate causes: plugin variants (each changes one distillation setting)", ""]
    if not variants["variants"]:
        lines.append(f"Not run: {', '.join(variants['not run']) or 'no variants declared'}.")
    else:
        lines += ["The reference is the standard plugin of the same seed, evaluated again on the same "
                  "models and images as the variants. Points, paired bootstrap 95% CIs.", "",
                  "| plugin | gain 0 -> 16 | gap closed 0 -> 16 | vs reference 0 -> 16 | gain 16 -> 0 "
                  "| vs reference 16 -> 0 |", "|---|---|---|---|---|---|"]
        for name, row in variants["variants"].items():
            c = row["closure"]
            closed = (f"{c['fraction']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
                      if c["fraction"] is not None else "no gap")
            keys = [k for k in row if k.startswith("gain ")]
            lo_hi, hi_lo = keys[0].split()[1], keys[1].split()[1]
            lines.append(f"| {name} | {_ci(row[f'gain {lo_hi}'])} | {closed} | "
                         f"{'-' if name == 'reference' else _ci(row[f'vs reference {lo_hi}'])} | "
                         f"{_ci(row[f'gain {hi_lo}'])} | "
                         f"{'-' if name == 'reference' else _ci(row[f'vs reference {hi_lo}'])} |")
        chance = variants.get("standard seed vs seed")
        if chance:
            lines += ["", "By chance alone, the standard plugin's seed 1 against its seed 0: " + "; ".join(
                f"{pair} {_ci(d)}" for pair, d in chance.items()) + "."]
    lines += ["", "## Endpoint 4: PYRA against ToMe + LoRA at `high`", ""]
    if "not run" in pyra:
        lines.append(f"Not run: {pyra['not run']}.")
        return "\n".join(lines) + "\n"
    e = pyra["endpoint"]
    chosen = ", ".join(f"{t} {lr:g}" for t, lr in pyra["modulator_lr_chosen"].items())
    lines += [f"PYRA (modulator learning rate picked per task on val200: {chosen}) minus ToMe + LoRA, "
              f"both fine-tuned and run at `{pyra['schedule']}`, pooled over tasks and "
              f"{len(pyra['seeds'])} seeds: "
              f"**{_ci(e)}** points ({100 * e['accuracy_a']:.1f}% -> {100 * e['accuracy_b']:.1f}%).", "",
              "| comparison with ToMe + LoRA | PYRA - LoRA (points) [95% CI] |", "|---|---|"]
    lines += [f"| {name} (every task) | {_ci(d)} |" for name, d in pyra["per_arm"].items()]
    lines += [f"| {task} (subgroup), lr picked on val | {_ci(d)} |" for task, d in pyra["per_task"].items()]
    if any(math.isnan(v) for v in pyra["val_acc"].values()):
        lines.append("Some units have no validation accuracy; their choice of rate is unreliable.")
    lines += ["", "Mean val200 accuracy at the end of fine-tuning, over seeds (what picks the rate): "
              + "; ".join(f"{k} {100 * v:.1f}%" for k, v in pyra["val_acc"].items()) + "."]
    if pyra.get("mean_val_curves"):  # the plot is drawn from the same curves
        lines += ["", "![val200 accuracy while fine-tuning, per arm](evidence-pyra.png)"]
    return "\n".join(lines) + "\n"

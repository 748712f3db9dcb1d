"""The ``adapt`` stage of the evidence run: the universal plugin adapted to each fine-tuned model.

Per unit (task, source, seed) of the declared subset: ``tocom adapt`` on the task's ``train800``
images (labels unused) from the universal plugin of seed ``adapt_plugin_seed``, then one record of
per-image test predictions at every target: no plugin, the universal plugin at the scale picked on
val200, and the adapted plugin at its own scale. The endpoints
(``docs/results/README.md``, "Adaptation") are computed from these records alone:

- A1 / A2: the fraction of the mismatch gap the adapted plugin closes at low -> high / high -> low,
  (adapted - none) / (matched - none), where "matched" is the model fine-tuned at the target degree
  run there, with an image bootstrap (seeds, then images, when there are several seeds);
- A3: adapted minus universal (picked scale) in both directions, paired bootstrap and McNemar;
- secondary: every (source, target) pair per task, and the minutes each adaptation took.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from research.paper.keys import MODEL, default_device, digest, write_json
from tocom.atomic import atomic_write_text
from tocom.compensator import Compensator, attach, set_degree
from tocom.finetuned import eval_transform_for, load_model
from tocom.jobs.adapt import AdaptConfig, run_adapt
from tocom.jobs.evaluate import select_scales
from tocom.models import patch
from tocom.report.provenance import provenance
from tocom.report.stats import pooled_difference

RESAMPLES, SEED = 10_000, 0


def adapt_config(ev) -> AdaptConfig:
    p = ev.p
    return AdaptConfig(steps=p.adapt_steps, batch_size=p.adapt_batch, lr=p.adapt_lr, device=ev.device,
                       progress=ev.progress)


def adapted_path(ev, task: str, source: int, seed: int) -> Path:
    model = ev.model_path(task, source, seed)
    key = digest(model.name, ev.plugin_path(ev.p.adapt_plugin_seed).name, adapt_config(ev).recorded())
    return ev.work / "adapted" / f"{model.stem}-{key}.tocom.safetensors"


def record_path(ev, task: str, source: int, seed: int) -> Path:
    plugin = adapted_path(ev, task, source, seed)
    return ev.work / "predictions" / "adapted" / (plugin.name.removesuffix(".tocom.safetensors") + ".json")


def units(ev) -> list[tuple[str, int, int]]:
    return [(task, source, seed) for seed in ev.p.adapt_seeds for task in ev.p.adapt_tasks
            for source in ev.p.sources]


def run_stage(ev) -> None:
    """Adapt and predict every unit that has no record yet (fine-tuning a missing model first)."""
    for task, source, seed in ev._todo("adapt", units(ev), lambda u: record_path(ev, *u)):
        model_file = ev.model_path(task, source, seed)
        if not model_file.is_file():
            ev._finetune(task, source, seed)
        universal_file = ev.plugin_path(ev.p.adapt_plugin_seed)
        if not universal_file.is_file():
            ev._distill(ev.p.adapt_plugin_seed)
        out = adapted_path(ev, task, source, seed)
        run_dir = Path(str(out) + ".run")
        if not out.is_file():
            images = ev.task_dir(task) / "images/train800"
            run_adapt("deit_tiny_patch16_224", model_file, universal_file, images, out, adapt_config(ev),
                      run_dir=run_dir, resume=(run_dir / "last.ckpt").is_file())
        adapted, universal = Compensator.load(out), Compensator.load(universal_file)
        targets = list(ev.p.targets)
        val = ev._sweep(model_file, task, "val", source, universal, ev.p.scales, targets)
        chosen = select_scales(val)
        universal_test = test_rows(ev, model_file, task, source, None, {}, targets)
        universal_test += test_rows(ev, model_file, task, source, universal, chosen, targets)
        adapted_test = test_rows(ev, model_file, task, source, adapted, {}, targets)
        write_json(record_path(ev, task, source, seed), {
            "task": task, "source": source, "seed": seed, "model": model_file.name,
            "model_sha256": ev.digest(model_file), "universal": universal_file.name,
            "universal_sha256": ev.digest(universal_file), "selected": chosen,
            "adapted": out.name,
            "adapted_record": {k: v for k, v in adapted.spec.adapted.items() if k != "curve"},
            "curve": adapted.spec.adapted.get("curve", []),
            "test": universal_test, "adapted_test": adapted_test,
            "ran_on": provenance(ev.device)})


@torch.no_grad()  # not inference_mode: attach records the weights' version counters
def test_rows(ev, model_file: Path, task: str, source: int, plugin: Compensator | None,
              scales: dict, targets: list[int]) -> list[dict]:
    """Per-image test predictions at each target, without a plugin or with ``plugin`` at ``scales[t]``
    (its own scale where absent): only the configurations the endpoints read, unlike a sweep's
    every-scale-at-every-target grid. At the source a plugin adds nothing, so that row is skipped."""
    device = ev.device or default_device()
    model = patch(load_model(MODEL, model_file)).to(device).eval()
    data = ev._eval_images(task, "test", eval_transform_for(model_file, model))
    images, labels = data.tensors
    if plugin is not None:
        attach(model, plugin, source=source)
    rows = []
    for t in targets:
        if plugin is not None and t == source:
            continue
        scale = scales.get(t, scales.get(str(t))) if plugin is not None else None
        if plugin is not None:
            set_degree(model, t, scale=scale)
        else:
            model.r = t
        preds = torch.cat([model(images[i:i + ev.p.eval_batch].to(device)).argmax(-1).cpu()
                           for i in tqdm(range(0, len(images), ev.p.eval_batch), disable=not ev.progress,
                                         desc=f"test r={t}", leave=False)])
        rows.append({"target": t, "source": source, "plugin": plugin is not None,
                     "scale": scale if plugin is None or scale is not None else plugin.spec.scale,
                     "accuracy": float((preds == labels).float().mean()), "split": "test",
                     "predictions": preds.tolist(), "labels": labels.tolist()})
    return rows


# ----- analysis ---------------------------------------------------------------------------------
def _correct(row: dict) -> np.ndarray:
    return np.asarray(row["predictions"]) == np.asarray(row["labels"])


def arms(record: dict) -> dict[tuple[str, int], np.ndarray]:
    """Per-image correctness of each arm at each target: none, universal (scale picked on val200),
    adapted."""
    out = {}
    for row in record["test"]:
        t = row["target"]
        if not row["plugin"]:
            out[("none", t)] = _correct(row)
        if row["plugin"] and row["scale"] == record["selected"].get(str(t), record["selected"].get(t)):
            out[("universal", t)] = _correct(row)
    for row in record["adapted_test"]:
        out[("adapted", row["target"])] = _correct(row)
    # at the source a plugin's delta is zero: both plugin arms are the model itself
    at_source = out[("none", record["source"])]
    out[("universal", record["source"])] = out[("adapted", record["source"])] = at_source
    return out


def gap_fraction(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_resamples: int = RESAMPLES,
                 seed: int = SEED) -> dict:
    """Fraction of the mismatch gap closed, (mean(plugin) - mean(none)) / (mean(matched) - mean(none)),
    pooled over runs, with a percentile bootstrap that resamples images within each run (one index
    draw for the three arms of a run, which share the test images).

    ``pairs``: per run, (none, plugin, matched) correctness arrays of shape ``(N,)``.
    """
    rng = np.random.default_rng(seed)

    def fraction(stats):
        none, plug, match = (np.mean([s[i] for s in stats], axis=0) for i in range(3))
        with np.errstate(divide="ignore", invalid="ignore"):
            return (plug - none) / (match - none)

    point = fraction([(a.mean(), b.mean(), c.mean()) for a, b, c in pairs])
    draws = []
    for a, b, c in pairs:
        idx = rng.integers(0, len(a), (n_resamples, len(a)))
        draws.append((a[idx].mean(1), b[idx].mean(1), c[idx].mean(1)))
    boot = fraction(draws)
    boot = boot[np.isfinite(boot)]
    gap = float(np.mean([c.mean() - a.mean() for a, _, c in pairs]))
    return {"fraction": float(point), "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)), "gap_points": 100 * gap, "runs": len(pairs),
            "resamples_kept": int(len(boot))}


def analyze(ev, out: Path) -> Path:
    """Write ``adapt.json`` and ``adapt.md`` from the stage's records."""
    paths = [record_path(ev, *u) for u in units(ev)]
    records = [json.loads(path.read_text()) for path in paths if path.is_file()]
    if not records:
        raise FileNotFoundError("no adaptation records yet: run python -m research.paper all --stage adapt")
    by = {(r["task"], r["source"], r["seed"]): arms(r) for r in records}
    lo, hi = min(ev.p.sources), max(ev.p.sources)
    result: dict = {"protocol": {k: getattr(ev.p, k) for k in ("adapt_tasks", "adapt_seeds", "adapt_steps",
                                                             "adapt_batch", "adapt_lr", "adapt_plugin_seed")},
                    # the analysis here; each unit's own run (commit, versions, device) in "units"
                    "provenance": provenance(),
                    "units": [{k: r[k] for k in ("task", "source", "seed", "model", "model_sha256", "adapted",
                                                 "ran_on")} for r in records],
                    "endpoints": {}, "pairs": [], "minutes": []}
    lines = ["# Adaptation: the universal plugin adapted to each fine-tuned model (generated by "
             "`python -m research.paper all --stage adapt`)", ""]
    for name, src, tgt in (("A1", lo, hi), ("A2", hi, lo)):
        keys = [k for k in by if k[1] == src and (k[0], tgt, k[2]) in by]
        matched = [by[(k[0], tgt, k[2])][("none", tgt)] for k in keys]
        runs = [(by[k][("none", tgt)], by[k][("adapted", tgt)], m) for k, m in zip(keys, matched)]
        uni = [(by[k][("none", tgt)], by[k][("universal", tgt)], m) for k, m in zip(keys, matched)]
        result["endpoints"][name] = {"direction": f"{src}->{tgt}", "adapted": gap_fraction(runs),
                                     "universal": gap_fraction(uni)}
    for src, tgt in ((lo, hi), (hi, lo)):
        cells = [(by[k][("universal", tgt)], by[k][("adapted", tgt)]) for k in by if k[1] == src]
        d = pooled_difference(cells, n_resamples=RESAMPLES, seed=SEED)
        result["endpoints"][f"A3 {src}->{tgt}"] = d.as_dict()
    for k, arm in sorted(by.items()):
        task, src, seed = k
        for tgt in ev.p.targets:
            if tgt == src:
                continue
            row = {"task": task, "source": src, "seed": seed, "target": tgt}
            for base in ("none", "universal"):
                d = pooled_difference([(arm[(base, tgt)], arm[("adapted", tgt)])], n_resamples=RESAMPLES,
                                      seed=SEED)
                row[f"vs_{base}"] = {"a": d.accuracy_a, "b": d.accuracy_b, "diff": d.difference,
                                     "ci": [d.ci_low, d.ci_high], "p": d.mcnemar_p[0]}
            result["pairs"].append(row)
    for r in records:
        result["minutes"].append({"task": r["task"], "source": r["source"], "seed": r["seed"],
                                  "minutes": r["adapted_record"]["wall_s"] / 60,
                                  "picked_step": r["adapted_record"]["picked_step"],
                                  "ran_on": r["ran_on"].get("device")})
    lines += _markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "adapt.json", json.dumps(result, indent=1))
    atomic_write_text(out / "adapt.md", "\n".join(lines) + "\n")
    return out / "adapt.json"


def _ci(lo: float, hi: float, scale: float = 1.0, digits: int = 2) -> str:
    return f"[{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"


def _markdown(result: dict) -> list[str]:
    e = result["endpoints"]
    lines = ["## Endpoints", "",
             "| endpoint | direction | adapted | universal (picked scale) | gap (points) |",
             "|---|---|---|---|---|"]
    for name in ("A1", "A2"):
        a, u = e[name]["adapted"], e[name]["universal"]
        lines.append(f"| {name}: fraction of the gap closed | {e[name]['direction']} | "
                     f"**{a['fraction']:.2f}** {_ci(a['ci_low'], a['ci_high'])} | "
                     f"{u['fraction']:.2f} {_ci(u['ci_low'], u['ci_high'])} | {a['gap_points']:.2f} |")
    lines += ["", "| A3: adapted - universal | universal (%) | adapted (%) | points [95% CI] | McNemar p |",
              "|---|---|---|---|---|"]
    for name in [k for k in e if k.startswith("A3")]:
        d = e[name]
        p = ", ".join(f"{m['p']:.2g}" for m in d["mcnemar"])
        lines.append(f"| {name.split(' ')[1]} | {100 * d['accuracy_a']:.1f} | {100 * d['accuracy_b']:.1f} | "
                     f"**{100 * d['difference']:+.2f}** {_ci(d['ci_low'], d['ci_high'], 100)} | {p} |")
    lines += ["", "## Every (source, target) pair (secondary)", "",
              "| task | seed | source | target | none (%) | universal (%) | adapted (%) | adapted - none "
              "[95% CI] | adapted - universal [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["pairs"]:
        n, u = r["vs_none"], r["vs_universal"]
        lines.append(f"| {r['task']} | {r['seed']} | {r['source']} | {r['target']} | {100 * n['a']:.1f} | "
                     f"{100 * u['a']:.1f} | {100 * n['b']:.1f} | {100 * n['diff']:+.2f} "
                     f"{_ci(*n['ci'], 100)} | {100 * u['diff']:+.2f} {_ci(*u['ci'], 100)} |")
    lines += ["", "## Minutes per adaptation", "", "| task | source | seed | minutes | step kept | device |",
              "|---|---|---|---|---|---|"]
    for m in result["minutes"]:
        lines.append(f"| {m['task']} | {m['source']} | {m['seed']} | {m['minutes']:.1f} | "
                     f"{m['picked_step']} | {m['ran_on']} |")
    return lines

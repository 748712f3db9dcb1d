"""Four training-free reduction rules at the same cost: ToMe, EViT, PiToMe and ToFu (issue 30).

    python benchmarks/methods.py \
        --model deit-tiny deit_tiny_patch16_224@$TOCOM_SHARED/weights/deit_tiny_patch16_224.safetensors \
                $TOCOM_SHARED/data/imagenet-sample \
        --r 8 12 16 --rounds 6 --threads 2 [--plugin pitome=PATH ...] [--out docs/results]
    python benchmarks/methods.py --smoke          # tiny random model, generated images, seconds

For every model (``--model NAME ARCH[@CHECKPOINT] DATASET``, repeatable) and every rule at every r:

- top-1 on the dataset (a folder of images with ``labels.txt`` lines ``FILE CLASS``, or a VTAB-1k /
  ImageFolder dataset, whose test split is used), with the paired bootstrap CI of the difference to
  ToMe at the same r (``tocom.report.stats.paired_difference``, images resampled);
- the analytic GFLOPs, which must agree across rules at the same r (every rule removes r tokens
  per block, so token counts are equal); the script refuses to report otherwise;
- CPU throughput at each batch size, every (configuration, batch size) pair timed round robin in
  ONE interleaved run with the order rotated every round, median over rounds
  (``tocom.report.bench.time_interleaved``); the unpatched model is timed in the same run.

With ``--plugin METHOD=PATH`` each such rule is also run with its own compensator plugin, attached
at degree 0 and switched to each r (top-1 with and without it, paired CI).

Writes ``OUT/methods.json`` (with provenance), ``OUT/methods.md`` and ``OUT/methods.png`` (top-1
against images/s at the largest batch size).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tocom
from tocom.atomic import atomic_write_text
from tocom.compensator import Compensator, attach, set_degree
from tocom.data import eval_transform, load_dataset, write_vtab
from tocom.finetuned import eval_transform_for, load_model
from tocom.jobs.distill import LabelledFiles
from tocom.models import is_patched
from tocom.models.loading import create_model
from tocom.report.bench import time_interleaved
from tocom.report.plots import accuracy_plot
from tocom.report.provenance import provenance
from tocom.report.stats import paired_difference, pooled_difference

RULES = ("tome", "evit", "pitome", "tofu")


def load_images(root: Path, model: torch.nn.Module, limit: int | None, checkpoint: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) images and (N,) labels of a dataset folder, preprocessed as ``checkpoint`` records
    (a ``tocom finetune`` file), else as timm does for ``model``."""
    transform = eval_transform_for(checkpoint, model) if checkpoint else eval_transform(model)
    if (root / "labels.txt").is_file():
        data = LabelledFiles(root, transform, require_labels=True)
    else:
        data = load_dataset(root, "test", transform)
    n = len(data) if limit is None else min(limit, len(data))
    items = [data[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def predict(model: torch.nn.Module, images: torch.Tensor, batch: int = 100) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(chunk).argmax(-1) for chunk in images.split(batch)]).numpy()


def build(arch_ref: str) -> torch.nn.Module:
    """``ARCH`` (random weights) or ``ARCH@CHECKPOINT``: local weights, plain or a ``tocom finetune``
    checkpoint (adapters in place), returned unpatched so that each rule patches its own copy."""
    arch, _, checkpoint = arch_ref.partition("@")
    model = load_model(arch, checkpoint or None)
    if is_patched(model):
        tocom.unpatch(model)
    return model.eval()


def evaluate(name: str, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             rs: list[int], plugins: dict[str, str]) -> dict:
    """Top-1, GFLOPs and paired CIs of every rule at every r, plus the plugin stage."""
    y = labels.numpy()
    stock = predict(model, images)
    patched = {rule: tocom.patch(copy.deepcopy(model), rule) for rule in RULES}
    correct, rows = {}, []
    for r in rs:
        costs = {rule: tocom.schedule_report(patched[rule], r) for rule in RULES}
        if len({(c["gflops"], tuple(c["tokens"])) for c in costs.values()}) != 1:
            raise ValueError(f"{name}: the rules do not cost the same at r={r}: {costs}")
        for rule in RULES:
            patched[rule].r = r
            correct[rule, r] = predict(patched[rule], images) == y
        for rule in RULES:
            vs = None if rule == "tome" else paired_difference(correct["tome", r], correct[rule, r])
            rows.append({"rule": rule, "r": r, "gflops": costs[rule]["gflops"],
                         "tokens": costs[rule]["tokens"][-1], "top1": float(correct[rule, r].mean()),
                         "vs_tome": None if vs is None else vs.as_dict()})
    plugin_rows = []
    for rule, path in plugins.items():
        plugin = Compensator.load(path)
        with_plugin = attach(tocom.patch(copy.deepcopy(model), rule), plugin, source=0)
        for r in rs:
            set_degree(with_plugin, r)
            got = predict(with_plugin, images) == y
            diff = paired_difference(correct[rule, r], got)
            plugin_rows.append({"rule": rule, "plugin": str(path), "r": r, "without": diff.accuracy_a,
                                "with": diff.accuracy_b, "gain": diff.as_dict()})
    return {"stock_top1": float((stock == y).mean()), "rows": rows, "plugins": plugin_rows,
            "gflops_stock": tocom.schedule_report(patched["tome"], 0)["gflops"],
            # per-image correctness ("0"/"1" per image, in dataset order): the pooled CIs and any
            # later analysis are computed from these alone
            "correct": {f"{rule} r={r}": "".join("1" if c else "0" for c in hits)
                        for (rule, r), hits in correct.items()}}


def _hits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def pooled(entries: list[dict], rs: list[int], batches: list[int]) -> list[dict]:
    """Each rule against ToMe at each r, pooled over the models (the mean of the per-model
    differences, images resampled within each model), with its slowest throughput ratio to ToMe
    over the models at each batch size, and the declared verdict: "beats ToMe" when the pooled CI
    lies above 0 and every ratio is at least 0.95."""
    rows = []
    for r in rs:
        for rule in RULES[1:]:
            tome, other = f"tome r={r}", f"{rule} r={r}"
            diff = pooled_difference([(_hits(e["correct"][tome]), _hits(e["correct"][other]))
                                      for e in entries])
            ratio = {str(b): min(e["images_per_s"][other][str(b)] / e["images_per_s"][tome][str(b)]
                                 for e in entries) for b in batches}
            rows.append({"rule": rule, "r": r, "models": [e["name"] for e in entries],
                         "vs_tome": diff.as_dict(), "min_speed_ratio": ratio,
                         "beats_tome": bool(diff.ci_low > 0 and min(ratio.values()) >= 0.95)})
    return rows


def throughput(model: torch.nn.Module, rs: list[int], batches: list[int], img_size: int, rounds: int,
               device: torch.device) -> dict[str, dict[str, float]]:
    """Images/s of the stock model and every (rule, r) at every batch size, in one interleaved run."""
    stock = copy.deepcopy(model).to(device)
    configs = {"stock": (stock, 0)}
    for rule in RULES:
        for r in rs:
            configs[f"{rule} r={r}"] = (tocom.patch(copy.deepcopy(model), rule).to(device), r)
    inputs = {b: torch.randn(b, 3, img_size, img_size, device=device) for b in batches}
    runners, prepare = {}, {}
    for label, (m, r) in configs.items():
        for b in batches:
            key = f"{label} | batch {b}"
            runners[key] = lambda m=m, x=inputs[b]: _infer(m, x)
            if label != "stock":
                prepare[key] = lambda m=m, r=r: setattr(m, "r", r)
    seconds = time_interleaved(runners, device, rounds=rounds, prepare=prepare, progress=False)
    out: dict[str, dict[str, float]] = {}
    for key, s in seconds.items():
        label, _, b = key.partition(" | batch ")
        out.setdefault(label, {})[b] = int(b) / s  # keyed by the batch size as text, as JSON keeps it
    return out


def _infer(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)


def _ci(vs: dict | None) -> str:
    if vs is None:
        return "-"
    return f"{100 * vs['difference']:+.1f} [{100 * vs['ci_low']:+.1f}, {100 * vs['ci_high']:+.1f}]"


def render(results: dict) -> str:
    """The markdown page of a results dict."""
    cfg = results["config"]
    kind = "smoke run, random weights" if cfg["smoke"] else "real run"
    lines = [f"# Reduction rules at equal cost ({kind})", "",
             f"Written by `benchmarks/methods.py` (r = {cfg['r']}, {cfg['rounds']} interleaved rounds, "
             f"{cfg['threads']} threads, {results['provenance']['device']}). Top-1 in %; *vs ToMe* is the "
             "paired difference in points with its 95% bootstrap CI; GFLOPs are analytic, per image.", ""]
    b = [str(x) for x in cfg["batch_sizes"]]
    for entry in results["models"]:
        stock = entry["images_per_s"]["stock"]
        title = f"## {entry['name']}: `{entry['arch']}` on `{entry['dataset']}` ({entry['n_images']} images)"
        lines += [title,
                  "", f"Unpatched: top-1 {100 * entry['stock_top1']:.1f}, {entry['gflops_stock']:.3g} "
                  "GFLOPs, " + ", ".join(f"{stock[x]:.1f} img/s at batch {x}" for x in b), "",
                  "| rule | r | GFLOPs | top-1 | vs ToMe | " + " | ".join(f"img/s b{x}" for x in b) + " |",
                  "|---|---|---|---|---|" + "---|" * len(b)]
        for row in entry["rows"]:
            speed = " | ".join(f"{row['images_per_s'][x]:.1f}" for x in b)
            lines.append(f"| {row['rule']} | {row['r']} | {row['gflops']:.3g} | {100 * row['top1']:.1f} | "
                         f"{_ci(row['vs_tome'])} | {speed} |")
        if entry["plugins"]:
            lines += ["", "| rule | plugin | r | without | with | gain |", "|---|---|---|---|---|---|"]
            for p in entry["plugins"]:
                lines.append(f"| {p['rule']} | `{Path(p['plugin']).name}` | {p['r']} | "
                             f"{100 * p['without']:.1f} | {100 * p['with']:.1f} | {_ci(p['gain'])} |")
        lines.append("")
    if results.get("pooled"):
        b = [str(x) for x in cfg["batch_sizes"]]
        names = ", ".join(results["pooled"][0]["models"])
        lines += [f"## Pooled over {names}", "",
                  "Mean over the models of each rule's difference to ToMe at the same r, in points, with "
                  "its 95% bootstrap CI (images resampled within each model); the slowest throughput ratio "
                  "to ToMe over the models; *beats ToMe*: CI above 0 and every ratio at least 0.95.", "",
                  "| rule | r | vs ToMe (pooled) | " + " | ".join(f"speed vs ToMe b{x}" for x in b)
                  + " | beats ToMe |", "|---|---|---|" + "---|" * len(b) + "---|"]
        for row in results["pooled"]:
            ratios = " | ".join(f"{row['min_speed_ratio'][x]:.3f}" for x in b)
            lines.append(f"| {row['rule']} | {row['r']} | {_ci(row['vs_tome'])} | {ratios} | "
                         f"{'yes' if row['beats_tome'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def smoke_setup(tmp: Path) -> tuple[list[list[str]], dict[str, str]]:
    """A tiny random ViT checkpoint, a generated 24-image task and one random plugin per merging rule."""
    torch.manual_seed(0)
    arch = "vit_tiny_patch16_224"
    kw = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=4)
    model = create_model(arch, **kw).eval()
    from tocom.models.loading import save_model

    save_model(model, tmp / "tiny.safetensors", arch, model_kwargs=kw)
    write_vtab("shape", tmp / "task", seed=0, image_size=32, n_train=4, n_val=4, n_test=24)
    plugins = {}
    for rule in ("pitome", "tofu"):
        plugin = Compensator.init_for(model, groups=4, method=rule)
        with torch.no_grad():
            plugin.B.normal_(0, 0.05)
        plugin.save(tmp / f"{rule}.tocom.safetensors")
        plugins[rule] = str(tmp / f"{rule}.tocom.safetensors")
    return [["tiny", f"{arch}@{tmp / 'tiny.safetensors'}", str(tmp / "task")]], plugins


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=3, action="append", metavar=("NAME", "ARCH[@CHECKPOINT]", "DATASET"),
                   help="a model to compare (repeatable)")
    p.add_argument("--r", type=int, nargs="+", default=[8, 12, 16])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", help="where throughput is timed (accuracy runs on the CPU)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--plugin", action="append", default=[], metavar="METHOD=PATH",
                   help="also run METHOD with this plugin, attached at 0 and switched to each r")
    p.add_argument("--out", type=Path, default=None, help="results folder (default docs/results; "
                   "--smoke: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, generated images, seconds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="tocom-methods-"))
    plugins = {}
    for spec in args.plugin:
        rule, _, path = spec.partition("=")
        if rule not in RULES or not path:
            p.error(f"--plugin takes METHOD=PATH with METHOD one of {RULES}, got {spec!r}")
        plugins[rule] = path
    models = args.model or []
    if args.smoke:
        models, smoke_plugins = smoke_setup(tmp)
        plugins = plugins or smoke_plugins
        args.r, args.batch_sizes, args.rounds = [1, 2, 3], [1, 4], 2
        args.out = args.out or tmp / "results"
    elif not models:
        p.error("give at least one --model NAME ARCH[@CHECKPOINT] DATASET, or --smoke")
    out = args.out or Path("docs/results")
    device = torch.device(args.device)
    entries = []
    parts = Path("runs/methods-parts")  # one finished model per file: a killed run resumes at the next one
    for name, arch_ref, dataset in models:
        part = parts / f"{name}.json"
        key = {"arch": arch_ref, "dataset": dataset, "r": args.r, "batch_sizes": args.batch_sizes,
               "rounds": args.rounds, "threads": args.threads, "limit": args.limit, "plugins": plugins}
        if not args.smoke and part.is_file():
            done = json.loads(part.read_text())
            if done.get("key") == key:
                print(f"{name}: reusing {part}", file=sys.stderr)
                entries.append(done["entry"])
                continue
        model = build(arch_ref)
        images, labels = load_images(Path(dataset), model, args.limit, arch_ref.partition("@")[2] or None)
        print(f"{name}: {len(labels)} images; evaluating {len(RULES)} rules at r = {args.r}", file=sys.stderr)
        entry = {"name": name, "arch": arch_ref, "dataset": dataset, "n_images": len(labels),
                 **evaluate(name, model, images, labels, args.r, plugins)}
        speeds = throughput(model, args.r, args.batch_sizes, images.shape[-1], args.rounds, device)
        entry["images_per_s"] = speeds
        for row in entry["rows"]:
            row["images_per_s"] = speeds[f"{row['rule']} r={row['r']}"]
        entries.append(entry)
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(part, json.dumps({"key": key, "entry": entry}))
    config = {"r": args.r, "batch_sizes": args.batch_sizes, "rounds": args.rounds, "threads": args.threads,
              "limit": args.limit, "plugins": plugins, "smoke": args.smoke, "command": sys.argv}
    results = {"experiment": "methods", "wall_s": round(time.time() - started, 1),
               "provenance": provenance(args.device), "config": config, "models": entries,
               "pooled": pooled(entries, args.r, args.batch_sizes)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "methods.json", json.dumps(results, indent=2))
    page = render(results)
    atomic_write_text(out / "methods.md", page)
    last = str(args.batch_sizes[-1])
    for entry in entries:
        curves = {rule: [(row["images_per_s"][last], row["top1"]) for row in entry["rows"]
                         if row["rule"] == rule] for rule in RULES}
        suffix = "" if len(entries) == 1 else f"-{entry['name']}"
        accuracy_plot(curves, out / f"methods{suffix}.png", title=f"{entry['name']}: r = {args.r}",
                      xlabel=f"images/s at batch {last} ({args.device})")
    print(page)
    print(f"wrote {out / 'methods.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()

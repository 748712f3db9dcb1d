"""Markdown tables of experiment results, written next to their JSON files."""

from __future__ import annotations

from tocom.report.tables import format_table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def render(name: str, results: dict) -> str:
    """A Markdown summary of one experiment's results (accuracies in %)."""
    if name == "segmentation":
        return segmentation_markdown(results)
    lines = [f"# {name} (budget {results.get('budget')}, {results.get('wall_s')} s)", ""]
    if name == "mismatch":
        for task, curves in results["accuracy"].items():
            targets = sorted({int(t) for points in curves.values() for t in points})
            rows = [
                {"model": label, **{f"r={t}": _pct(points.get(str(t), points.get(t))) for t in targets}}
                for label, points in curves.items()
            ]
            lines += [f"## {task}", "", format_table(rows), ""]
    elif name == "gap":
        rows = [
            {
                "gap from": r["from"],
                "applied to": r["to"],
                "M0 at r=16": _pct(r["M0_at_16"]),
                "M0 + gap at r=16": _pct(r["M0_plus_gap_at_16"]),
                "change": _signed(r["gain"]),
                "M0 + random, equal norm": _pct(r.get("M0_plus_random_at_16")),
                "change (control)": _signed(r["random_gain"]) if "random_gain" in r else "-",
            }
            for r in results["rows"]
        ]
        lines += [format_table(rows), ""]
    elif name == "pyra":
        rows = [
            {
                "method": r["method"],
                "schedule": r["schedule"],
                "top-1": _pct(r["accuracy"]),
                "images/s": f"{r['throughput']:.1f}",
            }
            for r in results["rows"]
        ]
        lines += [format_table(rows), ""]
    else:  # gains, ablations, evit: rows of with/without plugin
        rows = [
            {
                **({"variant": r["variant"]} if "variant" in r else {}),
                "task": r["task"],
                "source": r["source"],
                "target": r["target"],
                "without": _pct(r["without"]),
                "with ToCom": _pct(r["with"]),
                "gain": _signed(r["gain"]),
                "s": r["scale"],
            }
            for r in results["rows"]
        ]
        lines += [format_table(rows), ""]
        gains = [r["gain"] for r in results["rows"]]
        if gains:
            lines += [
                f"Mean gain {_signed(sum(gains) / len(gains))} points over {len(gains)} settings; "
                f"{sum(g > 0 for g in gains)} up, {sum(g < 0 for g in gains)} down.",
                "",
            ]
    return "\n".join(lines)


def segmentation_markdown(results: dict) -> str:
    """The Markdown page of :func:`segmentation`'s results (mIoU in %)."""
    lines = [f"# segmentation (budget {results.get('budget')}, {results.get('wall_s')} s)", "",
             f"DeiT-Tiny + linear decoder fine-tuned at r = 0 in dense mode on the generated shapes task "
             f"({results['finetune']['images']} training images, {results['finetune']['epochs']} epochs); "
             f"dense-mode plugin distilled for {results['distill'].get('steps')} steps (L1 on per-token "
             f"features). r = tokens merged before each MLP (paper r = r / {results['tokens_per_degree']}). "
             f"{results['test_images']} test images; scale chosen per target on validation.", "",
             "| r (tokens) | paper r | GFLOPs (ratio) | mIoU without (%) | mIoU with ToCom (%) | s |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['target']} | {r['paper_r']} | {r['gflops']:.3f} "
                     f"({r['gflops_ratio']:.3f}) | {100 * r['miou_without']:.1f} | "
                     f"{100 * r['miou_with']:.1f} | {r['scale']} |")
    lines += ["", "Paired differences (dataset mIoU, B = with ToCom, A = without; percentile bootstrap "
              "over test images, the whole-set mIoU recomputed per resample; McNemar does not apply):", "",
              results["table"], "", "## Paper", "", results["paper"], ""]
    return "\n".join(lines)

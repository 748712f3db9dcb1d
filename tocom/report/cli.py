"""``tocom report RESULTS.json``: paired statistics for the comparisons a results file declares."""

from __future__ import annotations

import argparse
import json

# The statistics (scipy) are imported in run(), so that building the CLI parser stays fast.


def parse_filter(text: str) -> dict:
    """``target=16,plugin=null`` or a JSON object -> a configuration filter; values are read as JSON
    where they parse (16, 0.2, null, true) and kept as strings otherwise."""
    text = text.strip()
    if text.startswith("{"):
        try:
            where = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"filter {text!r} is not a valid JSON object ({err})") from err
        if not isinstance(where, dict):
            raise ValueError(f"filter {text!r} must be a JSON object")
        return where
    where = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"filter item {item!r} is not KEY=VALUE (e.g. target=16,plugin=null)")
        try:
            where[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            where[key.strip()] = value
    return where


def _filter_arg(text: str) -> dict:
    try:
        return parse_filter(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="accuracies, paired bootstrap CIs and McNemar tests from a results JSON",
        description="For each comparison declared in RESULTS.json (or the one given by --a/--b): "
                    "the accuracies, the paired difference B - A with its bootstrap CI, and exact "
                    "McNemar p per run. Reads the per-image predictions saved beside the JSON.")
    p.add_argument("results", help="results JSON; its predictions file(s) must sit beside it")
    p.add_argument("--a", type=_filter_arg, help="baseline configurations, e.g. target=16,plugin=null")
    p.add_argument("--b", type=_filter_arg, help="compared configurations, e.g. target=16,scale=0.2")
    p.add_argument("--pair-on", help="configuration keys that pair runs of A and B (default: task,seed)")
    p.add_argument("--resamples", type=int, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="one JSON object per comparison instead of a table")
    p.set_defaults(func=run)
    return p


def _comparisons(args: argparse.Namespace, results: dict) -> list:
    from tocom.report.compare import PAIR_ON, Comparison

    if (args.a is None) != (args.b is None):
        raise ValueError("give both --a and --b, or neither (to use the declared comparisons)")
    if args.a is not None:
        pair_on = tuple(k.strip() for k in args.pair_on.split(",") if k.strip()) if args.pair_on else PAIR_ON
        return [Comparison(f"{json.dumps(args.b)} vs {json.dumps(args.a)}", args.a, args.b, pair_on)]
    declared = results.get("comparisons")
    if not declared:
        raise ValueError(f"{args.results} declares no comparisons; pass --a and --b "
                         "(e.g. --a target=16,plugin=null --b target=16,plugin=standard)")
    return [Comparison.from_dict(entry) for entry in declared]


def run(args: argparse.Namespace) -> None:
    """Print the comparisons' table (or JSON lines); bad input raises ValueError/FileNotFoundError."""
    from tocom.report.compare import compare, comparison_table
    from tocom.report.records import load_results
    from tocom.report.stats import RESAMPLES

    results, records = load_results(args.results)
    resamples = RESAMPLES if args.resamples is None else args.resamples
    comparisons = _comparisons(args, results)
    outcomes = [compare(records, c, n_resamples=resamples, seed=args.seed) for c in comparisons]
    if args.json:
        for o in outcomes:
            print(json.dumps({"name": o.comparison.name, "a": o.comparison.a, "b": o.comparison.b,
                              "runs": list(o.runs), **o.stats.as_dict()}))
        return
    images = sum(r.n_images for r in records)
    print(f"{args.results}: {len(records)} prediction file(s), {images} images; B - A with a "
          f"paired bootstrap CI ({resamples} resamples), exact McNemar p per run\n")
    print(comparison_table(outcomes))

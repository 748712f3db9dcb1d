"""``python -m research.paper NAME ...``: the papers' experiments, from a clone of the repository.

    python -m research.paper all --shared ../shared                 # the evidence run, every stage
    python -m research.paper all --stage adapt analyze --shared ../shared
    python -m research.paper mismatch gap --budget small --shared ../shared

``all`` runs the pre-declared evidence run (``research/paper/evidence.py``), resumable stage by
stage; the other names are the older one-seed miniatures (``research/paper/suite.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from research.paper import EXPERIMENTS, run_experiment
from research.paper.common import BUDGETS
from research.paper.evidence import PROTOCOLS, STAGES, run_evidence


def shard(text: str) -> tuple[int, int]:
    """``I/N`` as a pair, checked."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N, such as 0/3; got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m research.paper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="+", choices=["all", *sorted(EXPERIMENTS)],
                   help="all: the evidence run (plugins, finetune, predict, analyze), resumable by stage")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small", help="for the miniatures")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper-mini", help="for all")
    p.add_argument("--stage", nargs="+", choices=STAGES,
                   help="for all: only these stages (default: every stage, in order)")
    p.add_argument("--device", help="for all: cuda or cpu (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="for all: data loader workers")
    p.add_argument("--shard", type=shard, default=(0, 1), metavar="I/N",
                   help="for all: this process runs every N-th unit from the I-th (0-based); start N "
                        "processes, then analyze alone")
    p.add_argument("--out", default="docs/results", help="where results files go")
    p.add_argument("--shared", help="folder of the real weights and data, laid out as ../shared "
                                    "(default: $TOCOM_SHARED)")
    p.add_argument("--plugin", default="plugins/deit_tiny_patch16_224.tocom.safetensors",
                   help="the plugin for the miniatures' default settings (distilled at the budget if absent)")
    p.add_argument("--work", help="cache of models, plugins and evaluations "
                                  "(default: runs/experiments, runs/evidence for all)")
    return p


def run(args: argparse.Namespace) -> None:
    if args.name == ["all"]:
        path = run_evidence(args.work or "runs/evidence", args.out, args.protocol,
                            tuple(args.stage) if args.stage else STAGES, args.device, args.workers,
                            shard=args.shard, shared=args.shared)
        if path is not None:
            print(f"wrote {path}")
        return
    if "all" in args.name:
        raise ValueError("'all' runs the evidence stages on its own; pass it alone")
    for name in args.name:
        path = run_experiment(name, args.out, args.budget, args.work or "runs/experiments",
                              shared=args.shared, plugin=args.plugin)
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"python -m research.paper: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

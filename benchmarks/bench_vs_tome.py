"""Throughput of tocom against stock timm and the original ToMe structure, in one interleaved run.

    python benchmarks/bench_vs_tome.py --model deit_small_patch16_224 --batch-size 32 --rounds 7

Prints a Markdown table (and JSON lines with --json). Weights do not affect speed, so the model is
built with random weights unless --checkpoint is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tome_original  # noqa: E402

from tocom.models.loading import create_model  # noqa: E402
from tocom.report.bench import bench  # noqa: E402
from tocom.report.tables import format_table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--r", type=int, nargs="+", default=[0, 8, 16])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.model, args.checkpoint).eval()
    baseline = {}
    for r in args.r:
        if r > 0:
            fn = (lambda x, r=r: tome_original.forward(model, x, r))
            baseline[f"original ToMe r={r}"] = (lambda x, f=fn: _no_grad(f, x), str(r))
    rows = bench(model, args.r, "tome", args.batch_size, "cpu", rounds=args.rounds, extra=baseline)
    dicts = [row.as_dict() for row in rows]
    print(f"{args.model}, batch {args.batch_size}, {args.rounds} rounds, {args.threads} threads, "
          f"torch {torch.__version__}")
    print("\n".join(json.dumps(d) for d in dicts) if args.json else format_table(dicts))


def _no_grad(fn, x):
    with torch.inference_mode():
        return fn(x)


if __name__ == "__main__":
    main()

"""Throughput of tocom against stock timm and the original ToMe structure, in interleaved runs.

    python benchmarks/bench_vs_tome.py --model deit_small_patch16_224 deit_tiny_patch16_224 \
        --batch-sizes 1 8 32 --r 0 16 --rounds 12 --threads 2 [--compiled] [--device cuda]

For every model, batch size and mode (eager, and with --compiled each runner compiled by
torch.compile), all configurations are timed round-robin in one run with the order rotated every
round (tocom's time_interleaved), and reported as ratios against stock timm in that same run.
Weights do not affect speed, so models are built with random weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tome_original  # noqa: E402

import tocom  # noqa: E402
from tocom.models.loading import create_model  # noqa: E402
from tocom.report.bench import (
    time_interleaved,  # noqa: E402
)


def runners_for(model: torch.nn.Module, rs: list[int], x: torch.Tensor, compiled: bool) -> dict:
    """name -> zero-argument callable, for stock, tocom at each r and original ToMe at each r > 0."""
    def wrap(fn):
        return torch.compile(fn) if compiled else fn

    def call(fn):
        return lambda: fn(x)

    runners = {"stock timm": call(wrap(copy.deepcopy(model)))}
    for r in rs:
        patched = tocom.patch(copy.deepcopy(model))
        patched.r = r
        runners[f"tocom r={r}"] = call(wrap(patched))
        if r > 0:
            original = copy.deepcopy(model)
            runners[f"original ToMe r={r}"] = call(wrap(
                lambda inp, m=original, r=r: tome_original.forward(m, inp, r)))
    return runners


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["deit_small_patch16_224"])
    p.add_argument("--batch-sizes", "--batch-size", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--r", type=int, nargs="+", default=[0, 16])
    p.add_argument("--rounds", type=int, default=12, help="a multiple of the runner count rotates fairly")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--compiled", action="store_true", help="also time every runner under torch.compile")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the thread's CPU time (needs --threads 1), robust on a shared machine")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        p.error("--clock cpu measures one thread on the CPU: add --threads 1 and use --device cpu")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} threads, {device}, {args.clock} clock, "
          f"{args.rounds} rounds, medians")
    print("| model | batch | mode | configuration | ms / batch | vs stock |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.model:
        model = create_model(name).eval().to(device)
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, 224, 224, device=device)
            for mode in ["eager"] + (["compiled"] if args.compiled else []):
                runners = runners_for(model, args.r, x, mode == "compiled")
                with torch.inference_mode():
                    seconds = time_interleaved(runners, device, rounds=args.rounds, warmup=2, progress=False,
                                               clock=clock)
                for config, s in seconds.items():
                    ratio = seconds["stock timm"] / s
                    row = {"model": name, "batch": batch, "mode": mode, "config": config,
                           "ms": round(s * 1e3, 2), "speedup": round(ratio, 3)}
                    line = f"| {name} | {batch} | {mode} | {config} | {s * 1e3:.1f} | {ratio:.2f}x |"
                    print(json.dumps(row) if args.json else line, flush=True)


if __name__ == "__main__":
    main()

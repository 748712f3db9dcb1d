"""Cost of a live degree switch (`tocom.set_degree`) against one single-image forward at r = 16.

    python benchmarks/degree_switch.py --model deit_small_patch16_224 deit_tiny_patch16_224 --threads 2

A switch from the source degree 0 to degree g folds g groups; the issue's target is under 10% of a
batch-1 forward. Switches and forwards alternate (interleaved), medians are reported. With
--threads 1 the clock is the thread's CPU time, which other processes on a busy machine do not
inflate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tocom
from tocom.models.loading import create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["deit_small_patch16_224"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--groups", type=int, nargs="+", default=[1, 8, 16])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"{args.threads} threads, {args.rounds} rounds (medians); forward: batch 1 at r = 16")
    print("| model | forward ms | switch to g | switch ms | share of a forward |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.model:
        model = create_model(name).eval()
        plugin = tocom.Compensator.init_for(model)
        torch.nn.init.normal_(plugin.B, std=0.01)
        tocom.attach(model, plugin, source=0)
        x = torch.randn(1, 3, 224, 224)
        forward, switch = [], {g: [] for g in args.groups}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for g in args.groups:
                    tocom.set_degree(model, 16)  # served at r = 16, its delta folded in
                    start = clock()
                    model(x)
                    forward.append(clock() - start)
                    start = clock()
                    tocom.set_degree(model, g)  # folds g groups (source 0)
                    switch[g].append(clock() - start)
        fwd = statistics.median(forward)
        for g, times in switch.items():
            s = statistics.median(times)
            print(f"| {name} | {fwd * 1e3:.1f} | {g} | {s * 1e3:.2f} | {s / fwd:.1%} |")


if __name__ == "__main__":
    main()

"""PYRA's inference cost against plain ToMe at the same schedule, timed interleaved in one run.

    python benchmarks/pyra_cost.py --model deit_small_patch16_224 --r high --batch-size 32 --rounds 7

Random weights are enough for throughput; PYRA's W_D is drawn non-zero so that the modulation
does its full work (at initialisation it is the identity but still computed). Prints a markdown
table: images/s (median over rounds), the ratio to ToMe, analytic GFLOPs with PYRA's extra MACs.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

import tocom
from tocom.compress import gflops, parse_schedule
from tocom.pyra import PyraModulator, add_pyra, pyra_flops
from tocom.report.bench import time_interleaved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--r", default="high", help="schedule: low, high, an int, a list or flops=RATIO")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    tome = tocom.patch(timm.create_model(args.model, pretrained=False)).to(device).eval()
    dims = tocom.dims_of(tome)
    tome.r = parse_schedule(args.r, dims)
    pyra = add_pyra(copy.deepcopy(tome))
    with torch.no_grad():
        for m in pyra.modules():
            if isinstance(m, PyraModulator):
                m.w_d.normal_(0, 0.02)  # W_D starts at zero; a trained one is not
    size = tome.patch_embed.img_size[0]
    x = torch.randn(args.batch_size, 3, size, size, device=device)

    def run(model):
        def fn():
            with torch.inference_mode():
                return model(x)
        return fn

    with torch.inference_mode():  # same outputs up to the modulation: a sanity check, not a timing
        assert not torch.equal(tome(x[:2]), pyra(x[:2])), "PYRA weights did not move"
    seconds = time_interleaved({"tome": run(tome), "tome+pyra": run(pyra)}, device, rounds=args.rounds)
    schedule = list(tome.r)
    base = gflops(dims, schedule)
    extra = pyra_flops(dims, schedule) / 1e9
    ips = {k: args.batch_size / s for k, s in seconds.items()}
    print(f"model {args.model}, r={args.r} {schedule}, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians)")
    print("| method | img/s | vs ToMe | GFLOPs |")
    print("| --- | --- | --- | --- |")
    print(f"| ToMe | {ips['tome']:.1f} | 1.000 | {base:.3f} |")
    print(f"| ToMe + PYRA | {ips['tome+pyra']:.1f} | {ips['tome+pyra'] / ips['tome']:.3f} | "
          f"{base + extra:.4f} (+{extra * 1e3:.2f} MFLOPs) |")


if __name__ == "__main__":
    main()

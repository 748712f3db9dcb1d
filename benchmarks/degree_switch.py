"""Time of a live degree switch (`tocom.set_degree`) against one single-image forward.

    python benchmarks/degree_switch.py --model deit_small_patch16_224 --threads 2
"""

from __future__ import annotations

import argparse

import torch

import tocom
from tocom.models.loading import create_model
from tocom.report.bench import time_interleaved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.model).eval()
    plugin = tocom.Compensator.init_for(model)
    torch.nn.init.normal_(plugin.B, std=0.01)
    tocom.attach(model, plugin, source=0)
    x = torch.randn(1, 3, 224, 224)
    degrees = iter(range(10**9))

    def forward():
        with torch.inference_mode():
            model(x)

    def switch():
        tocom.set_degree(model, next(degrees) % 17)

    t = time_interleaved({"single-image forward": forward, "set_degree": switch}, torch.device("cpu"),
                         rounds=args.rounds)
    print(f"{args.model}, {args.threads} threads, {args.rounds} rounds (medians)")
    for name, seconds in t.items():
        print(f"| {name} | {seconds * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()

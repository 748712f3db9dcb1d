"""How much a busy Python thread in the same process slows a forward, at r = 0 and r = 16.

    python research/gil_contention.py --checkpoint runs/cifar10_full_r0.safetensors

Why `tocom serve` runs the model in a worker process of its own: a forward at a high degree is
hundreds of small operations, and each one, having released the interpreter lock around its
kernel, must take it back from whatever other Python thread holds it (a server's request
handling). The neighbour thread here works ``duty`` of each millisecond in pure Python and sleeps
the rest. One torch thread; medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from tocom.finetuned import load_model
from tocom.models import is_patched, patch


def busy(stop: threading.Event, duty: float) -> None:
    """Pure-Python work for ``duty`` of each millisecond until ``stop`` is set."""
    while not stop.is_set():
        end = time.perf_counter() + duty / 1000
        while time.perf_counter() < end:
            pass
        time.sleep((1 - duty) / 1000)


def forward_ms(model, images: torch.Tensor, degree: int) -> float:
    model.r = degree
    start = time.perf_counter()
    with torch.inference_mode():
        model(images)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--checkpoint", help="weights (default: random)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--duty", type=float, nargs="+", default=[0.0, 0.3, 1.0],
                   help="share of each millisecond the neighbour thread runs Python (0: no neighbour)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, args.checkpoint).eval()
    if not is_patched(model):
        patch(model, "tome")
    size = model.patch_embed.img_size
    images = torch.randn(args.batch_size, 3, *size)
    for degree in (0, 16):  # warm-up
        forward_ms(model, images, degree)
    print(f"{args.model}, batch {args.batch_size}, 1 torch thread: median ms per forward")
    print("neighbour duty | r = 0 | r = 16 | r = 0 slowdown | r = 16 slowdown")
    quiet = None
    for duty in args.duty:
        stop = threading.Event()
        neighbour = threading.Thread(target=busy, args=(stop, duty), daemon=True) if duty > 0 else None
        if neighbour:
            neighbour.start()
        times = {0: [], 16: []}
        for _ in range(args.rounds):
            for degree in times:
                times[degree].append(forward_ms(model, images, degree))
        stop.set()
        if neighbour:
            neighbour.join()
        med = {d: statistics.median(t) for d, t in times.items()}
        quiet = quiet or med
        slow = {d: med[d] / quiet[d] for d in med}
        print(f"{duty:.0%} | {med[0]:.0f} | {med[16]:.0f} | {slow[0]:.2f}x | {slow[16]:.2f}x")


if __name__ == "__main__":
    main()

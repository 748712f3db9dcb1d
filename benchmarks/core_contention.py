"""Does a busy neighbouring core slow the model's forwards? (a probe for the serving benchmark)

In `benchmarks/serve_load.py --pin` the model workers run alone on the last core, and the client,
Ray's proxy and the replicas' HTTP side share the others. Forwards timed by the worker under
load ran 6-29% slower than the same forwards timed in one quiet process. This probe times
forwards of a DeiT-Tiny pinned to the last core, one torch thread, while the other core is:

  idle   - nothing of ours runs there;
  spin   - a pure-Python loop (the interpreter work of HTTP handling, no memory traffic);
  decode - a loop of the replica front's own work per request: ``decode_image`` of a CIFAR-sized
           PNG, then the squash-to-224 transform (memory traffic as well as compute).

The phases alternate in rounds, so a drift of the machine's speed over minutes spreads over all
of them. Linux only (``os.sched_setaffinity``); random weights (the time does not depend on them).

Usage: python benchmarks/core_contention.py [--rounds 4] [--repeats 10]   (about 3 minutes)
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

from tocom.models import patch
from tocom.models.loading import create_model

PHASES = ("idle", "spin", "decode")


def spin(cores: set[int], stop, ready=None) -> None:
    """A pure-Python loop on ``cores`` until ``stop`` is set (``ready`` set once it runs there)."""
    os.sched_setaffinity(0, cores)
    if ready is not None:
        ready.set()
    n = 0
    while not stop.is_set():
        for _ in range(10_000):
            n += 1


def _neighbour(kind: str, core: int, ready, stop) -> None:
    """Keep ``core`` busy with work of ``kind`` until ``stop`` is set; ``ready`` once it runs there."""
    if kind == "spin":
        spin({core}, stop, ready)
        return
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    from PIL import Image

    from tocom.data import transform_from_record
    from tocom.serve.images import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 60, 200)).save(buf, format="PNG")
    data = buf.getvalue()
    # The record `tocom finetune` writes for a VTAB-1k recipe: squash to 224, bicubic.
    squash = transform_from_record({"resize": "squash", "size": 224, "interpolation": "bicubic",
                                    "crop_pct": 1.0, "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225]})
    squash(decode_image(data))
    ready.set()
    while not stop.is_set():
        squash(decode_image(data))


def time_forwards(model: torch.nn.Module, degree: int, batch: int, repeats: int) -> float:
    """Median milliseconds of ``repeats`` forwards of ``batch`` random images at ``degree``."""
    x = torch.randn(batch, 3, 224, 224)
    times = []
    with torch.inference_mode():
        model(x, r=degree)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, r=degree)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10, help="forwards per degree, phase and round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--degrees", default="0,16")
    args = p.parse_args(argv)
    if not hasattr(os, "sched_setaffinity"):
        p.error("needs Linux (os.sched_setaffinity)")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        p.error("needs at least two cores")
    model_core, other = cores[-1], cores[0]
    os.sched_setaffinity(0, {model_core})
    torch.set_num_threads(1)
    model = patch(create_model("deit_tiny_patch16_224", None, num_classes=10).eval(), "tome")
    degrees = [int(d) for d in args.degrees.split(",")]
    results: dict[tuple[str, int], list[float]] = {(ph, d): [] for ph in PHASES for d in degrees}
    ctx = mp.get_context("spawn")
    for rnd in range(args.rounds):
        for phase in PHASES:
            ready, stop, proc = ctx.Event(), ctx.Event(), None
            if phase != "idle":
                proc = ctx.Process(target=_neighbour, args=(phase, other, ready, stop), daemon=True)
                proc.start()
                # A spawned child starts on this core (it inherits the affinity) and imports
                # torch there: time nothing until it has moved to its own core and is working.
                if not ready.wait(timeout=120):
                    raise RuntimeError(f"the {phase} neighbour did not start")
            try:
                for d in degrees:
                    results[(phase, d)].append(time_forwards(model, d, args.batch, args.repeats))
            finally:
                if proc is not None:
                    stop.set()
                    proc.join(timeout=10)
                    if proc.is_alive():
                        proc.terminate()
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    print(f"DeiT-Tiny, batch {args.batch}, model on core {model_core}, neighbour on core {other}; "
          f"median ms of {args.repeats} forwards, median over {args.rounds} rounds")
    print("| neighbour | " + " | ".join(f"r = {d} ms" for d in degrees) + " | "
          + " | ".join(f"r = {d} / idle" for d in degrees) + " |")
    print("|---|" + "---|" * (2 * len(degrees)))
    for phase in PHASES:
        ms = [statistics.median(results[(phase, d)]) for d in degrees]
        idle = [statistics.median(results[("idle", d)]) for d in degrees]
        print(f"| {phase} | " + " | ".join(f"{m:.1f}" for m in ms) + " | "
              + " | ".join(f"{m / i:.3f}" for m, i in zip(ms, idle)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

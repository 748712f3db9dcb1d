"""Why do the model worker's forwards run slower under load than when calibrated? (a serving probe)

In `benchmarks/serve_load.py` the worker's own timing of a full batch at r = 16 was 1.45-1.5
times its calibration at 1x-2x load (r = 0: 1.0-1.4), and `benchmarks/core_contention.py` showed
that a busy neighbouring core costs a pinned forward nothing. This probe takes HTTP out and keeps
the rest of the path: a Ray actor pinned to the last core, one torch thread, running
``ModelWorker.run``-style forwards of a random-weight DeiT-Tiny on batches sent from the driver
the way a replica sends them (a float32 array through Ray's object store). Modes, each timed by
the actor around the forward alone and around the whole call:

  local      - forwards inside the actor, no calls arriving (what calibration sees);
  serial     - one call at a time: the next batch is sent after the answer is back;
  pipelined  - two calls in flight, as `--lead-ms` keeps them: a batch arrives during a forward;
  busy       - serial, while the driver keeps sending small no-op calls to the same actor
               (Ray's threads in the worker busy with messages during a forward);
  saturated  - pipelined, while three pure-Python loops oversubscribe the other cores, where the
               worker's own Ray threads run (only its forward thread is pinned): does a thread
               holding the interpreter lock on a starved core stall the forward?

Usage: python benchmarks/worker_forwards.py [--calls 40]   (about 2 minutes; Linux, 2+ cores)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np
import torch
from core_contention import spin  # benchmarks/ is on the path of a script run from it

MODES = ("local", "serial", "pipelined", "busy", "saturated")


class Worker:
    """A pinned model process; returns (probabilities, forward ms, call ms)."""

    def __init__(self, core: int):
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        from tocom.models import patch
        from tocom.models.loading import create_model

        self.model = patch(create_model("deit_tiny_patch16_224", None, num_classes=10).eval(), "tome")

    def run(self, images: np.ndarray, degree: int) -> tuple[np.ndarray, float, float]:
        start = time.perf_counter()
        x = torch.from_numpy(np.require(images, requirements="W"))
        with torch.inference_mode():
            t0 = time.perf_counter()
            probs = self.model(x, r=degree).softmax(-1)
            forward = (time.perf_counter() - t0) * 1000
        return probs.numpy(), forward, (time.perf_counter() - start) * 1000

    def local(self, batch: int, degree: int, n: int) -> list[float]:
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        return [self.run(x, degree)[1] for _ in range(n)]

    def noop(self) -> int:
        return 0


def _measure(worker, mode: str, x: np.ndarray, degree: int, n: int) -> tuple[list[float], list[float]]:
    """``n`` forwards in ``mode``: (forward ms, call ms) as the actor timed them."""
    import ray

    if mode == "local":
        return ray.get(worker.local.remote(len(x), degree, n)), []
    if mode == "saturated":
        ctx = mp.get_context("fork")  # no import: the loops start at once
        stop = ctx.Event()
        others = os.sched_getaffinity(0)  # the driver's cores: all but the worker's
        loops = [ctx.Process(target=spin, args=(others, stop), daemon=True) for _ in range(3)]
        for loop in loops:
            loop.start()
        try:
            return _measure(worker, "pipelined", x, degree, n)
        finally:
            stop.set()
            for loop in loops:
                loop.join(timeout=10)
    forward, call = [], []
    if mode == "pipelined":
        inflight = [worker.run.remote(x, degree)]
        for _ in range(n):
            inflight.append(worker.run.remote(x, degree))
            _, f, c = ray.get(inflight.pop(0))
            forward.append(f)
            call.append(c)
        ray.get(inflight)
        return forward, call
    for _ in range(n):
        ref = worker.run.remote(x, degree)
        noise = []
        while mode == "busy" and not ray.wait([ref], timeout=0.002)[0]:
            noise.append(worker.noop.remote())
        _, f, c = ray.get(ref)
        ray.get(noise)
        forward.append(f)
        call.append(c)
    return forward, call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=40, help="forwards per mode and degree")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--degrees", default="16,0")
    args = p.parse_args(argv)
    import ray

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        p.error("needs at least two cores")
    os.sched_setaffinity(0, set(cores[:-1]))  # the driver stays off the worker's core
    ray.init(num_cpus=len(cores), include_dashboard=False, log_to_driver=False)
    try:
        worker = ray.remote(Worker).options(num_cpus=1).remote(cores[-1])
        x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
        degrees = [int(d) for d in args.degrees.split(",")]
        forward = {(d, m): [] for d in degrees for m in MODES}
        call = {(d, m): [] for d in degrees for m in MODES}
        for d in degrees:
            ray.get(worker.local.remote(args.batch, d, 3))  # warm-up
        # Modes alternate in rounds: the machine's speed drifts by tens of percent over minutes.
        for rnd in range(args.rounds):
            for d in degrees:
                for mode in MODES:
                    f, c = _measure(worker, mode, x, d, args.calls // args.rounds)
                    forward[(d, mode)] += f
                    call[(d, mode)] += c
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        ray.shutdown()
    print(f"DeiT-Tiny, batch {args.batch}, Ray actor on core {cores[-1]}, one torch thread; "
          f"median of {args.calls} calls in {args.rounds} rounds")
    print("| r | mode | forward ms | call ms (in the actor) | forward / local |")
    print("|---|---|---|---|---|")
    for d in degrees:
        local = statistics.median(forward[(d, "local")])
        for m in MODES:
            f = statistics.median(forward[(d, m)])
            c = statistics.median(call[(d, m)]) if call[(d, m)] else float("nan")
            print(f"| {d} | {m} | {f:.1f} | {c:.1f} | {f / local:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

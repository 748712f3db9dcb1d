"""Throughput measured honestly: every configuration interleaved with the stock model in one run.

Timings on shared machines drift, so each round times every configuration once, back to back,
and we report medians over rounds; speed-ups are ratios within the same run.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tocom.compress import resolve_schedule
from tocom.models import dims_of, patch, schedule_report


@dataclass
class BenchRow:
    """One line of a benchmark table."""

    r: str
    method: str
    throughput: float  # images per second, median over rounds
    speedup: float  # vs the unpatched model in the same run
    gflops: float  # analytic, per image
    tokens: int  # tokens after the last block

    def as_dict(self) -> dict:
        return asdict(self)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nothing() -> None:
    return None


def time_interleaved(runners: dict[str, Callable[[], object]], device: torch.device, rounds: int = 5,
                     warmup: int = 1, progress: bool = True,
                     clock: Callable[[], float] = time.perf_counter,
                     prepare: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Median seconds per call of each runner, calling them round-robin ``rounds`` times.

    The order rotates every round, so each runner takes each position equally often (with rounds
    a multiple of the runner count) and no position bias (caches, clock boost) favours anyone.
    ``clock`` may be ``time.thread_time`` for single-threaded CPU runs on a shared machine.
    ``prepare[name]``, when given, runs untimed before each call of that runner (e.g. switching a
    shared model to the runner's degree).
    """
    prepare = prepare or {}
    for name, fn in runners.items():
        for _ in range(warmup):
            prepare.get(name, _nothing)()
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners.items())
    for i in tqdm(range(rounds), desc="bench rounds", disable=not progress, leave=False):
        shift = i % len(order)
        for name, fn in order[shift:] + order[:shift]:
            prepare.get(name, _nothing)()
            sync_device(device)
            start = clock()
            fn()
            sync_device(device)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(model: nn.Module, schedules: Sequence, method: str = "tome", batch_size: int = 32,
          device: str | torch.device = "cpu", rounds: int = 5, img_size: int | None = None,
          extra: dict[str, tuple[Callable[[torch.Tensor], object], str]] | None = None,
          progress: bool = True) -> list[BenchRow]:
    """Images/s of ``model`` patched at each schedule, against its unpatched copy.

    Args:
        model: a timm ViT (not modified; a patched copy is timed).
        schedules: the r values to time (any schedule form).
        extra: more runners to time in the same rounds, ``name -> (fn(images), r label)``.

    Returns:
        one :class:`BenchRow` per schedule (plus the stock model and extras).
    """
    device = torch.device(device)
    stock = copy.deepcopy(model).to(device).eval()
    patched = patch(copy.deepcopy(model), method).to(device).eval()
    dims = dims_of(stock)
    size = img_size or stock.patch_embed.img_size[0]
    x = torch.randn(batch_size, 3, size, size, device=device)

    def run_at(r):
        def fn():
            patched.r = r
            with torch.inference_mode():
                return patched(x)
        return fn

    def run_stock():
        with torch.inference_mode():
            return stock(x)

    runners: dict[str, Callable[[], object]] = {"stock": run_stock}
    labels = {"stock": ("-", "none", [0] * dims.depth)}
    for r in schedules:
        name = f"{method} r={r}"
        runners[name] = run_at(r)
        labels[name] = (str(r), method, resolve_schedule(r, dims.depth))
    for name, (fn, r_label) in (extra or {}).items():
        runners[name] = (lambda f=fn: f(x))
        labels[name] = (r_label, name, resolve_schedule(int(r_label), dims.depth))
    seconds = time_interleaved(runners, device, rounds=rounds, progress=progress)
    base = batch_size / seconds["stock"]
    rows = []
    for name, (r_label, meth, schedule) in labels.items():
        ips = batch_size / seconds[name]
        cost = schedule_report(patched, schedule)  # the model's own cost report (clamping, mode)
        rows.append(BenchRow(r_label, meth, ips, ips / base, cost["gflops"], cost["tokens"][-1]))
    return rows

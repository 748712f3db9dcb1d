"""Measuring a model's forward latency at every degree and batch size, cached per model and machine.

The cache is a folder of JSON files (``$TOCOM_CACHE``, else ``~/.cache/tocom``, under
``latency/``) named by a hash of everything the timings depend on: the architecture (not the
weights' values), the degrees, batch sizes, device, dtype, thread count, torch version and the
machine, and how the forward runs (eager, or the compiled runner's backend and buckets). A cached
table is reused as is; pass ``refresh=True`` after the machine changed load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from tocom.atomic import atomic_write
from tocom.compress.schedule import clamp_schedule, resolve_schedule
from tocom.models import dims_of, is_patched, patch
from tocom.report.bench import time_interleaved
from tocom.runtime import CompiledRunner
from tocom.serve.controller import LatencyTable

DEFAULT_DEGREES = (0, 4, 8, 12, 16)


def cache_dir() -> Path:
    """``$TOCOM_CACHE`` or ``~/.cache/tocom``."""
    return Path(os.environ.get("TOCOM_CACHE") or Path.home() / ".cache" / "tocom")


def batch_sizes_up_to(max_batch: int) -> list[int]:
    """1, 2, 4, ... and ``max_batch`` itself: the sizes worth timing for a dynamic batcher."""
    sizes = [b for b in (2**i for i in range(max_batch.bit_length())) if b < max_batch]
    return [*sizes, max_batch]


def distinct_degrees(model: nn.Module, degrees: Sequence[int]) -> list[int]:
    """``degrees`` sorted, without those whose clamped schedule equals a smaller degree's."""
    dims = dims_of(model)
    seen, out = set(), []
    for d in sorted(set(degrees)):
        key = tuple(clamp_schedule(resolve_schedule(d, dims.depth), dims.num_tokens, dims.num_prefix))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _machine() -> dict[str, str | int | None]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "system": platform.system(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def calibration_key(model: nn.Module, degrees: Sequence[int], batch_sizes: Sequence[int],
                    device: torch.device, dtype: torch.dtype, runner: dict | None = None) -> dict:
    """What a latency table depends on (hashed into the cache file name); ``runner``: how a
    compiled forward runs (its backend and buckets), None for the eager model."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    key = {"arch": type(model).__name__, "dims": asdict(dims_of(model)),
           "compression": asdict(model._tocom) if is_patched(model) else None,
           "degrees": list(degrees), "batch_sizes": list(batch_sizes), "device": device.type,
           "gpu": gpu, "dtype": str(dtype), "machine": _machine()}
    if runner is not None:  # absent for the eager model, so the tables cached before stay valid
        key["runner"] = runner
    return key


def _cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "latency" / f"{digest}.json"


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images ``model`` takes: timm's ``patch_embed`` (which may be non-square), else
    the family's dims (square grids: Hugging Face ViTs)."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        size = embed.img_size
        return (embed.proj.in_channels, *(size if isinstance(size, (tuple, list)) else (size, size)))
    dims = dims_of(model)
    return dims.in_chans, dims.square_image_size, dims.square_image_size


@torch.inference_mode()
def measure(model: nn.Module, degrees: Sequence[int], batch_sizes: Sequence[int],
            set_degree: Callable[[int], None] | None = None, rounds: int = 3,
            forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LatencyTable:
    """Median ms of a forward of random ``(B, C, H, W)`` images at each degree and batch size.

    Degrees are interleaved, in an order that rotates every round
    (:func:`tocom.report.bench.time_interleaved`), so slow drifts of a shared machine hit all alike.
    ``set_degree`` switches the model (default: ``model.r = degree``; the model must be patched).
    ``forward`` is what is timed, images (B, C, H, W) -> logits (default: ``model`` itself; a
    :func:`tocom.compile` runner of it, so that the table is of the graphs that will serve).
    """
    set_degree = set_degree or (lambda d: setattr(model, "r", d))
    forward = forward or model
    param = next(model.parameters())
    times: dict[int, dict[int, float]] = {d: {} for d in degrees}
    for b in batch_sizes:
        x = torch.randn(b, *_input_shape(model), device=param.device, dtype=param.dtype)
        # the switch runs untimed before each forward; the warm-up builds allocator state and kernels
        seconds = time_interleaved({d: (lambda x=x: forward(x)) for d in degrees}, param.device,
                                   rounds=rounds, progress=False,
                                   prepare={d: (lambda d=d: set_degree(d)) for d in degrees})
        for d in degrees:
            times[d][b] = seconds[d] * 1000
    return LatencyTable({d: {b: round(ms, 3) for b, ms in row.items()} for d, row in times.items()})


def calibrate(model: nn.Module, degrees: Sequence[int] = DEFAULT_DEGREES, max_batch: int = 16, *,
              set_degree: Callable[[int], None] | None = None, rounds: int = 3, refresh: bool = False,
              use_cache: bool = True, runner: CompiledRunner | None = None) -> tuple[LatencyTable, dict]:
    """The model's latency table, from the cache when this model and machine were measured before.

    With ``runner`` (a :func:`tocom.compile` runner of ``model``) the forwards timed are the
    runner's, at every batch size up to ``max_batch`` and every bucket of the runner up to it.
    Returns ``(table, info)``; ``info`` has the cache ``path``, whether it was ``cached`` and the
    ``seconds`` measuring took (0 when cached). The model is left at the last degree measured.
    """
    param = next(model.parameters())
    sizes = batch_sizes_up_to(max_batch)
    described = None
    if runner is not None:
        sizes = sorted({*sizes, *(b for b in runner.batch_sizes if b <= max_batch)})
        described = {"backend": runner.backend, "mode": runner.mode, "graphs": runner.graphs,
                     "buckets": list(runner.batch_sizes)}
    key = calibration_key(model, degrees, sizes, param.device, param.dtype, described)
    path = _cache_file(key)
    if use_cache and not refresh and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == json.loads(json.dumps(key)):
                return LatencyTable.from_json(data["ms"]), {"path": str(path), "cached": True, "seconds": 0.0}
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is measured again and overwritten
    start = time.perf_counter()
    table = measure(model, degrees, sizes, set_degree, rounds, forward=runner)
    seconds = round(time.perf_counter() - start, 2)
    if use_cache:
        body = json.dumps({"key": key, "ms": table.to_json(), "seconds": seconds}, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(body))
    return table, {"path": str(path), "cached": False, "seconds": seconds}


def degree_for_latency(model: nn.Module, budget_ms: float, batch_size: int = 1,
                       degrees: Sequence[int] = DEFAULT_DEGREES) -> int:
    """The least degree whose calibrated forward of ``batch_size`` images takes at most ``budget_ms``.

    Calibrates once per model and machine (cached, see :func:`calibrate`) on a patched copy, so
    ``model`` itself is not changed. Images are ``(batch_size, 3, H, W)`` at the model's size.

    Raises:
        ValueError: when even the largest degree is slower than the budget (the message gives
            its latency).
    """
    probe = copy.deepcopy(model).eval()
    if not is_patched(probe):
        patch(probe, "tome")
    candidates = distinct_degrees(probe, degrees)
    table, _ = calibrate(probe, candidates, max_batch=max(1, batch_size))
    for d in candidates:
        if table.predict(d, batch_size) <= budget_ms:
            return d
    fastest = min(table.predict(d, batch_size) for d in candidates)
    raise ValueError(f"no degree in {candidates} runs a batch of {batch_size} within {budget_ms} ms "
                     f"(fastest: {fastest:.1f} ms); raise the budget, lower the batch size or add degrees")

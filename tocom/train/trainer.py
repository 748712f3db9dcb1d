"""The training engine: one loop that every tocom objective (distill, finetune, ...) plugs into.

    cfg = TrainConfig(steps=2000, lr=1e-3, batch_size=64, warmup_steps=100, eval_every=500)
    result = train(objective, dataset, cfg, out_dir="runs/x", evaluate=my_eval)   # or under torchrun

Contract
  * ``objective`` is any ``nn.Module`` (see :class:`Objective`): it owns the trainable modules and the
    frozen ones it needs; ``objective(batch) -> loss | (loss, metrics)``. Per-step randomness (dropout,
    a random compression-degree pair) comes from the global torch / ``random`` / numpy RNGs, which
    are seeded per rank from ``(seed, rank)`` and saved in checkpoints.
  * The engine builds the loader itself (:mod:`tocom.train.loader`): deterministic per-epoch
    permutation, disjoint rank shards, drop_last, epochs roll over until ``steps``.
  * One step: ``lr <- lr_at(step)``; batch to device; forward under autocast; (scaled) backward;
    optional clipping; AdamW step. Then, at their intervals: log, checkpoint, evaluate.
  * ``evaluate(objective, step) -> {name: float}`` runs on *every* rank (so it may shard its data via
    :mod:`tocom.train.distributed`) in eval mode under ``no_grad``, with RNG states saved and restored
    around it; its results are averaged over ranks. Called every ``eval_every`` steps and at ``steps``.
  * Rank 0 alone writes ``out_dir/last.ckpt`` (see :mod:`tocom.train.checkpoint`), ``metrics.jsonl``
    and the progress bar; every rank gets the same :class:`TrainResult`.

Guarantee: ``train(..., stop_after=k)`` then ``train(..., resume=True)`` ends with parameters
bit-identical to one uninterrupted run, for the same device type, world size and config (any
``num_workers``), given deterministic kernels (always on CPU; on CUDA only with deterministic
algorithms) and an objective whose frozen parts are rebuilt identically.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tocom.atomic import atomic_write_text
from tocom.train import distributed
from tocom.train.checkpoint import (
    atomic_save,
    capture_rng,
    load_checkpoint,
    load_trainable_state,
    restore_rng,
    trainable_state,
)
from tocom.train.config import TrainConfig, build_optimizer, check_resumable, lr_at, resolve_amp
from tocom.train.loader import build_loader, mix_seed, move_to_device

__all__ = ["Objective", "TrainConfig", "TrainResult", "logged_evals", "lr_at", "train"]


logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What a (possibly resumed) call to :func:`train` did."""

    step: int  # optimiser steps done in total, including those before a resume
    history: list[dict[str, float]] = field(default_factory=list)  # this call's log records
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", **evaluate(...)}
    checkpoint: Path | None = None


class Objective(nn.Module):
    """Optional base class documenting what :func:`train` expects of an objective.

    ``forward(batch)`` gets the loader's batch already on the device and returns a 0-d ``loss`` or
    ``(loss, metrics)`` with floats / 0-d tensors (logged as running means over ``log_every``).
    Frozen parts: call ``requires_grad_(False)`` on them, and override ``train(mode)`` to keep a
    frozen teacher in eval mode. Optionally define ``optimizer_groups() -> list[dict]`` (``params``
    plus ``lr_scale`` / ``weight_decay``) to replace the default decay / no-decay split.
    """

    def forward(self, batch: Any) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError


def train(
    objective: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    out_dir: str | Path,
    resume: bool = False,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    device: str | torch.device | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``objective`` on ``dataset`` for ``config.steps`` steps (see module docstring).

    ``resume`` continues from ``out_dir/last.ckpt``; ``stop_after`` ends (with a checkpoint) after
    that global step, e.g. to split a run over job slots. Joins torchrun's process group if needed.
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    device = torch.device(device) if device is not None else distributed.default_device()
    if device.type == "cuda" and device.index is None:  # "cuda" under torchrun means this rank's GPU
        device = torch.device("cuda", distributed.local_rank())
    owned = distributed.setup(device)
    try:
        result = _train(objective, dataset, config, Path(out_dir), resume, evaluate, device, collate_fn,
                        config.steps if stop_after is None else min(stop_after, config.steps))
    except BaseException:
        if owned:  # no barrier: the other ranks may never reach one
            torch.distributed.destroy_process_group()
        raise
    distributed.teardown(owned)
    return result


def _train(objective: nn.Module, dataset: Dataset, config: TrainConfig, out_dir: Path, resume: bool,
           evaluate: Callable[[nn.Module, int], dict[str, float]] | None, device: torch.device,
           collate_fn: Callable[[list[Any]], Any] | None, end: int) -> TrainResult:
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    amp_dtype, use_scaler = resolve_amp(config.amp, device)
    objective.to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(objective, config)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    loader, sampler = build_loader(dataset, config.batch_size, seed=config.seed, rank=rank, world_size=world,
                                   num_workers=config.num_workers, collate_fn=collate_fn,
                                   pin_memory=device.type == "cuda")
    ckpt_path, log_path = out_dir / "last.ckpt", out_dir / "metrics.jsonl"
    step = 0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        check_resumable(ckpt, config, world)
        load_trainable_state(objective, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"][rank])
        step = ckpt["step"]
        if main:
            logger.info("resuming %s at step %d of %d", ckpt_path, step, config.steps)
            _truncate_log(log_path, step)  # drop records logged after the checkpoint, they get redone
    else:
        _seed_everything(mix_seed(config.seed, rank))  # per rank, so dropout noise differs across ranks
        if main:  # a fresh run owns its folder: an older run's records must not leak into this one's resume
            log_path.unlink(missing_ok=True)
            ckpt_path.unlink(missing_ok=True)
    model = objective
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(objective, device_ids=ids,
                                        find_unused_parameters=config.find_unused_parameters)

    result = TrainResult(step=step)
    bar = tqdm(total=config.steps, initial=step, disable=not (config.progress and main), desc="train")
    sums: dict[str, Any] = {}  # running sums since the last log, kept on device to avoid syncs
    count, tic = 0, time.perf_counter()

    def write(record: dict[str, Any]) -> None:
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    objective.train()
    while step < end:
        epoch, skip = divmod(step, sampler.batches_per_epoch)
        sampler.set_epoch(epoch, skip)  # skipping is index arithmetic: consumed batches are not loaded
        for batch in loader:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            batch = move_to_device(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, metrics = _unpack(model(batch))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            bar.update()
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
            count += 1

            if step % config.log_every == 0 or step == end:
                means = distributed.all_reduce_mean({k: float(v) / count for k, v in sums.items()})
                if not use_scaler and not math.isfinite(means["loss"]):
                    raise FloatingPointError(f"loss is {means['loss']} at step {step}; lower lr or clip")
                images_per_s = count * config.batch_size * world / (time.perf_counter() - tic)
                record = {"step": step, "epoch": epoch, "lr": lr, "img_per_s": images_per_s, **means}
                result.history.append(record)
                write({"kind": "train", **record})
                bar.set_postfix(loss=f"{means['loss']:.4g}", img_s=f"{images_per_s:.0f}")
                sums, count, tic = {}, 0, time.perf_counter()
            pause = time.perf_counter()
            # evaluate before saving: a checkpoint then implies its step's evaluation is logged, so a
            # run killed mid-evaluation redoes it rather than resuming past it (the RNG is unaffected)
            if evaluate is not None and ((config.eval_every and step % config.eval_every == 0)
                                         or step == config.steps):
                scores = _evaluate(objective, evaluate, step)
                result.evals.append(scores)
                write({"kind": "eval", **scores})
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == end:
                _save(ckpt_path, objective, optimizer, scaler, step, config, world, main)
                result.checkpoint = ckpt_path
            tic += time.perf_counter() - pause  # img/s measures training only
            if step >= end:
                break
    bar.close()
    result.step = step
    if result.checkpoint is None and ckpt_path.exists():
        result.checkpoint = ckpt_path  # resumed at or past the end: nothing new to write
    return result


def _unpack(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    if not torch.is_tensor(loss) or loss.ndim != 0:
        raise ValueError(f"objective must return a 0-d loss tensor (or (loss, metrics)), got {type(loss)}")
    return loss, metrics


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _save(path: Path, objective: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          step: int, config: TrainConfig, world: int, main: bool) -> None:
    rng = distributed.all_gather_object(capture_rng())  # every rank's stream, so all ranks resume exactly
    if main:
        atomic_save({"model": trainable_state(objective), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "world_size": world,
                     "config": asdict(config), "rng": rng}, path)
        logger.debug("checkpoint at step %d written to %s", step, path)
    distributed.barrier()  # when train() returns on any rank, the checkpoint exists


def _evaluate(objective: nn.Module, evaluate: Callable[[nn.Module, int], dict[str, float]],
              step: int) -> dict[str, float]:
    rng = capture_rng()  # evaluation must not shift the training RNG stream
    objective.eval()
    try:
        with torch.no_grad():
            scores = evaluate(objective, step)
    finally:
        objective.train()
        restore_rng(rng)
    return {"step": step, **distributed.all_reduce_mean({k: float(v) for k, v in scores.items()})}


def logged_evals(out_dir: str | Path) -> list[dict[str, float]]:
    """Every evaluation ``out_dir/metrics.jsonl`` holds, ``{"step", **scores}`` in step order.

    :class:`TrainResult` lists only the evaluations of its own call; after a resume the log also
    holds those made before the interruption (up to the checkpoint it resumed from).
    """
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{k: v for k, v in r.items() if k != "kind"} for r in read_log(path) if r.get("kind") == "eval"]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A torn last line (a run killed mid-write) is dropped; a
    broken line before it means the file was damaged otherwise, and raises ValueError naming it."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:
            if i == len(lines) - 1:
                logger.warning("%s: dropped a torn last line (a run killed while writing it)", path)
                break
            raise ValueError(f"{path}: line {i + 1} is not a training record; the log is damaged, "
                             "delete it to resume without the earlier records") from None
        records.append(record)
    return records


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        keep = [r for r in read_log(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

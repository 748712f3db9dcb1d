"""Deterministic, resumable data order for the training engine.

Order: epoch ``e`` uses ``randperm(len(dataset))`` seeded from ``(seed, e)``; rank ``r`` of ``W`` takes
``perm[r::W]`` (disjoint shards), cut into ``(len // W) // batch_size`` full batches (drop_last, so
every rank runs the same number of steps). A global step therefore maps to ``(epoch, batch)`` by
``divmod(step, batches_per_epoch)`` and resuming skips consumed batches by index, loading nothing.

Randomness inside ``dataset[i]`` (augmentation through torch / ``random`` / numpy global RNGs) is
re-seeded per item from ``(seed, epoch, index)`` by :class:`PerItemSeeded`, so it depends neither on
worker count nor on which batches were skipped; in the main process the caller's RNG is restored
around each item, so data loading never perturbs the training RNG stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def mix_seed(*values: int) -> int:
    """Hash non-negative ints into one 64-bit seed (SeedSequence avoids seed+epoch collisions)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0])


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and numpy global RNGs inside the block; restore them after."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seeding takes 32 bits
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class PerItemSeeded(Dataset):
    """Wraps a map-style dataset; indexed by ``(epoch, index)`` keys from :class:`EpochBatchSampler`."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded_rng(mix_seed(self.seed, epoch, index)):
            return self.dataset[index]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's batches of ``(epoch, index)`` keys for the epoch chosen by :meth:`set_epoch`."""

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n == 0:
            raise ValueError("dataset is empty: nothing to train on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shard = n // world_size
        if shard < batch_size:
            raise ValueError(
                f"batch_size {batch_size} is larger than this rank's shard ({n} samples / {world_size} "
                f"processes = {shard}); lower batch_size or use fewer processes"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = shard // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate next and how many of its batches were already consumed."""
        if not 0 <= start_batch < self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch})")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        shard = torch.randperm(self.n, generator=g)[self.rank :: self.world_size].tolist()
        b = self.batch_size
        for i in range(self.start_batch, self.batches_per_epoch):
            yield [(self.epoch, idx) for idx in shard[i * b : (i + 1) * b]]


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpochBatchSampler]:
    """A loader over ``dataset`` whose order is driven by the returned sampler's ``set_epoch``."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size)  # type: ignore[arg-type]
    loader = DataLoader(
        PerItemSeeded(dataset, seed),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,  # sampler runs in this process, so set_epoch still works
        # DataLoader draws its workers' base seed from this generator; without it each iter() would
        # consume the global torch RNG and a resumed run would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
    )
    return loader, sampler


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors nested in tuples / lists / dicts to ``device``; other leaves pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return type(batch)(move_to_device(v, device) for v in batch)  # type: ignore[call-arg]
    return batch

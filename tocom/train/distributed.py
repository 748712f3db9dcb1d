"""Small helpers around ``torch.distributed`` so the training loop reads the same with 1 or N processes.

Launch with ``torchrun --nproc_per_node N script.py``: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK,
:func:`setup` joins the group (``nccl`` for CUDA devices, ``gloo`` for CPU) and every helper below
degrades to the single-process answer when no group exists, so callers never branch on it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process: from the process group, else torchrun's ``RANK``, else 0.

    Falling back to the launcher's variables keeps the answer right before :func:`setup` and
    after :func:`teardown` (e.g. when only rank 0 must write the final file).
    """
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes: from the process group, else torchrun's ``WORLD_SIZE``, else 1."""
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """Rank on this node as set by torchrun (0 otherwise); picks the CUDA device."""
    return int(os.environ.get("LOCAL_RANK", 0))


def launched_by_torchrun() -> bool:
    """True when the environment carries torchrun's rendezvous variables."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_device() -> torch.device:
    """``cuda:<local_rank>`` when CUDA is usable, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def setup(device: torch.device | None = None) -> bool:
    """Join torchrun's process group if launched under torchrun and not already joined.

    The backend follows the device: ``nccl`` for CUDA, ``gloo`` for CPU. Returns True iff this call
    created the group, so that only its creator tears it down (a caller that set up the group
    itself, e.g. to run several trainings, keeps it).
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    device = device or default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def teardown(owned: bool = True) -> None:
    """Destroy the process group if ``owned`` (the value :func:`setup` returned)."""
    if owned and is_distributed():
        dist.barrier()  # no rank may leave while another still needs a collective
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl only reduces CUDA tensors; gloo reduces CPU tensors.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks. Every rank must pass the same keys (sorted for order)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: v / world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def all_gather_object(obj: Any) -> list[Any]:
    """Collect one picklable object from every rank, in rank order (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out

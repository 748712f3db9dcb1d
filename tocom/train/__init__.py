"""The training loop: one loop (AMP, DDP under torchrun, checkpoint/resume, progress) for every objective.

See :mod:`tocom.train.trainer` for the contract and the resume guarantee.
"""

from tocom.train.checkpoint import atomic_save, load_checkpoint
from tocom.train.config import TrainConfig, build_optimizer, lr_at
from tocom.train.loader import EpochBatchSampler, build_loader, move_to_device
from tocom.train.trainer import Objective, TrainResult, logged_evals, train

__all__ = [
    "EpochBatchSampler",
    "Objective",
    "TrainConfig",
    "TrainResult",
    "atomic_save",
    "build_loader",
    "build_optimizer",
    "load_checkpoint",
    "logged_evals",
    "lr_at",
    "move_to_device",
    "train",
]

"""Worker for ``test_train.py::test_torchrun_two_processes``; run under ``torchrun --nproc_per_node 2``.

Trains the toy objective uninterrupted (``OUT/a``) and interrupted + resumed (``OUT/b``) on CPU with
gloo, then each rank saves its final parameters and the sample indices it saw to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    from test_train import ToyData, make, trainables  # this script's directory is on sys.path

    from tocom.train import TrainConfig, distributed, train

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    owned = distributed.setup(torch.device("cpu"))  # one group for all three runs
    assert owned and distributed.world_size() == 2, "launch with torchrun --nproc_per_node 2"
    cfg = TrainConfig(steps=10, lr=1e-2, batch_size=4, warmup_steps=2, checkpoint_every=0, log_every=2,
                      seed=3, progress=False)
    full = make(dropout=0.3)
    train(full, ToyData(), cfg, out_dir=out / "a", device="cpu")
    train(make(dropout=0.3), ToyData(), cfg, out_dir=out / "b", device="cpu", stop_after=3)
    resumed = make(dropout=0.3)
    train(resumed, ToyData(), cfg, out_dir=out / "b", device="cpu", resume=True)
    torch.save({"full": trainables(full), "resumed": trainables(resumed), "seen": full.seen},
               out / f"rank{distributed.rank()}.pt")
    distributed.teardown(owned)

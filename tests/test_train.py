"""Tests for tocom.train: schedule, data order, checkpoints, resume equality, evaluation, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from tocom.train import (
    EpochBatchSampler,
    Objective,
    TrainConfig,
    atomic_save,
    build_optimizer,
    logged_evals,
    lr_at,
    train,
)
from tocom.train import checkpoint as ckpt_mod
from tocom.train.loader import PerItemSeeded, move_to_device


class ToyData(Dataset):
    """``y = x @ w`` with augmentation noise from the global torch RNG (as torchvision transforms do)."""

    def __init__(self, n: int = 40, d: int = 8, noise: float = 0.05) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.w, self.noise = torch.randn(n, d, generator=g), torch.randn(d, 1, generator=g), noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i] + self.noise * torch.randn(self.x.shape[1]), self.x[i] @ self.w, i


class ToyObjective(Objective):
    """MLP regression with dropout (consumes the global RNG) and a frozen layer (never checkpointed)."""

    def __init__(self, d: int = 8, hidden: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.frozen = nn.Linear(d, d).requires_grad_(False)
        self.seen: list[list[int]] = []  # sample indices per step, to check data order
        self.out_dtype: torch.dtype | None = None

    def forward(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        pred = self.net(x)
        self.out_dtype = pred.dtype
        return nn.functional.mse_loss(pred.float(), y), {"mae": (pred.float() - y).abs().mean()}


def make(seed: int = 0, **kw: float) -> ToyObjective:
    torch.manual_seed(seed)  # identical initialisation, as a real run rebuilding its model would have
    return ToyObjective(**kw)


def trainables(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_lr_at_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=10, lr=1.0, batch_size=1, warmup_steps=2, min_lr=0.1)
    assert [lr_at(s, cfg) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert lr_at(6, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # half-way: 0.55
    assert lr_at(10, cfg) == pytest.approx(0.1)
    decay = [lr_at(s, cfg) for s in range(2, 11)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(0, TrainConfig(steps=4, lr=2.0, batch_size=1)) == pytest.approx(2.0)  # no warm-up


@pytest.mark.parametrize("bad", [{"steps": 0}, {"amp": "fp8"}, {"warmup_steps": 11}, {"min_lr": 2.0}])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**{"steps": 10, "lr": 1.0, "batch_size": 1, **bad})


def test_optimizer_skips_decay_on_1d_params() -> None:
    opt = build_optimizer(make(), TrainConfig(steps=1, lr=1.0, batch_size=1, weight_decay=0.3))
    by_decay = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in opt.param_groups}
    assert by_decay == {0.3: {2}, 0.0: {1}}
    assert sum(len(g["params"]) for g in opt.param_groups) == 4  # frozen layer excluded


def test_training_lowers_loss_records_and_evaluates(tmp_path: Path) -> None:
    calls: list[tuple[int, bool, bool]] = []

    def evaluate(obj: nn.Module, step: int) -> dict[str, float]:
        calls.append((step, obj.training, torch.is_grad_enabled()))
        return {"val": float(step)}

    cfg = TrainConfig(steps=60, lr=3e-2, batch_size=8, weight_decay=0.0, log_every=10, eval_every=20,
                      checkpoint_every=25)
    obj = make()
    res = train(obj, ToyData(), cfg, out_dir=tmp_path, evaluate=evaluate, device="cpu")
    assert res.step == 60 and [h["step"] for h in res.history] == [10, 20, 30, 40, 50, 60]
    assert res.history[-1]["loss"] < 0.2 * res.history[0]["loss"]
    assert {"lr", "img_per_s", "mae", "epoch"} <= res.history[0].keys() and res.history[-1]["epoch"] == 11
    assert calls == [(20, False, False), (40, False, False), (60, False, False)]
    assert [e["val"] for e in res.evals] == [20.0, 40.0, 60.0]
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [ln["kind"] for ln in lines].count("eval") == 3 and len(lines) == 9
    ck = torch.load(res.checkpoint, weights_only=True)
    assert ck["step"] == 60 and ck["config"]["lr"] == 3e-2
    assert set(ck["model"]) == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"}
    assert torch.equal(ck["model"]["net.3.weight"], obj.net[3].weight)


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    obj = make()
    cfg = TrainConfig(steps=30, lr=1e-2, batch_size=8, amp="bf16", log_every=10, progress=False)
    res = train(obj, ToyData(), cfg, out_dir=tmp_path, device="cpu")
    assert obj.out_dtype == torch.bfloat16 and res.history[-1]["loss"] < res.history[0]["loss"]
    with pytest.raises(ValueError, match="fp16"):
        train(make(), ToyData(), TrainConfig(steps=1, lr=1.0, batch_size=8, amp="fp16"),
              out_dir=tmp_path, device="cpu")


@pytest.mark.parametrize("workers", [(0, 0, 0), (0, 2, 2)], ids=["workers0", "workers2"])
def test_resume_is_bit_identical(tmp_path: Path, workers: tuple[int, int, int]) -> None:
    # 40 samples / batch 8 = 5 batches per epoch: stopping at 7 resumes mid-epoch 1, skipping 2 batches.
    def cfg(nw: int) -> TrainConfig:
        return TrainConfig(steps=12, lr=5e-3, batch_size=8, warmup_steps=2, grad_clip=1.0, num_workers=nw,
                           checkpoint_every=5, log_every=3, eval_every=1, seed=7, progress=False)

    def evaluate(obj: nn.Module, step: int) -> dict[str, float]:
        return {"noise": torch.rand(()).item()}  # eats RNG: must not shift the training stream

    full = make(dropout=0.3)
    train(full, ToyData(), cfg(workers[0]), out_dir=tmp_path / "a", device="cpu", evaluate=evaluate)
    first = make(dropout=0.3)
    train(first, ToyData(), cfg(workers[1]), out_dir=tmp_path / "b", device="cpu", stop_after=7,
          evaluate=evaluate)
    assert not torch.equal(first.net[0].weight, full.net[0].weight)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # as if logged after the checkpoint, then killed
        f.write(json.dumps({"kind": "train", "step": 8}) + "\n")
    resumed = make(dropout=0.3)  # a fresh process would rebuild the objective like this
    res = train(resumed, ToyData(), cfg(workers[2]), out_dir=tmp_path / "b", device="cpu", resume=True,
                evaluate=evaluate)
    assert res.step == 12 and [h["step"] for h in res.history] == [9, 12]
    for name, p in trainables(full).items():
        assert torch.equal(p, trainables(resumed)[name]), name
    assert resumed.seen == full.seen[7:]  # the skipped batches were not loaded again
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if ln["kind"] == "train"] == [3, 6, 7, 9, 12]  # stale 8 dropped
    assert [e["step"] for e in res.evals] == list(range(8, 13))  # this call's evaluations only
    assert [e["step"] for e in logged_evals(tmp_path / "b")] == list(range(1, 13))  # the whole run's
    assert logged_evals(tmp_path / "b")[-1] == res.evals[-1]


def test_a_run_killed_while_evaluating_redoes_the_evaluation_on_resume(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=10, lr=1e-2, batch_size=8, checkpoint_every=5, eval_every=5, progress=False)
    calls = []

    def evaluate(obj: nn.Module, step: int) -> dict[str, float]:
        calls.append(step)
        if len(calls) == 2:  # the final evaluation, the first time: the process dies here
            raise KeyboardInterrupt
        return {"score": float(step)}

    with pytest.raises(KeyboardInterrupt):
        train(make(), ToyData(), cfg, out_dir=tmp_path, device="cpu", evaluate=evaluate)
    res = train(make(), ToyData(), cfg, out_dir=tmp_path, device="cpu", evaluate=evaluate, resume=True)
    assert res.step == 10 and calls == [5, 10, 10]
    assert logged_evals(tmp_path) == [{"step": 5, "score": 5.0}, {"step": 10, "score": 10.0}]


def test_a_fresh_run_clears_an_older_runs_log_and_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=6, lr=1e-2, batch_size=8, eval_every=2, progress=False)
    score = lambda obj, step: {"score": 1.0}  # noqa: E731
    train(make(), ToyData(), cfg, out_dir=tmp_path, device="cpu", evaluate=score)
    train(make(), ToyData(), cfg, out_dir=tmp_path, device="cpu", evaluate=score, stop_after=3)
    assert [e["step"] for e in logged_evals(tmp_path)] == [2]  # not the older run's 2, 4, 6 as well
    res = train(make(), ToyData(), cfg, out_dir=tmp_path, device="cpu", evaluate=score, resume=True)
    assert [e["step"] for e in logged_evals(tmp_path)] == [2, 4, 6] and res.step == 6


def test_resume_errors(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=6, lr=1e-2, batch_size=8, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(make(), ToyData(), cfg, out_dir=tmp_path, resume=True, device="cpu")
    train(make(), ToyData(), cfg, out_dir=tmp_path, stop_after=2, device="cpu")
    with pytest.raises(ValueError, match="config.lr"):
        train(make(), ToyData(), TrainConfig(steps=6, lr=1e-3, batch_size=8), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="shape"):
        train(make(hidden=4), ToyData(), cfg, out_dir=tmp_path, resume=True, device="cpu")
    relaxed = TrainConfig(steps=6, lr=1e-2, batch_size=8, progress=False, log_every=1)  # free to change
    assert train(make(), ToyData(), relaxed, out_dir=tmp_path, resume=True, device="cpu").step == 6


def test_input_errors(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=2, lr=1e-2, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train(make(), ToyData(n=0), cfg, out_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="shard"):
        train(make(), ToyData(n=5), cfg, out_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="requires_grad"):
        train(make().requires_grad_(False), ToyData(), cfg, out_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="0-d loss"):
        train(nn.Linear(1, 1), [torch.ones(1)] * 8, cfg, out_dir=tmp_path, device="cpu")


def test_atomic_save_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, path)

    def crash(obj: object, f: str) -> None:
        Path(f).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_sampler_shards_epochs_and_skip() -> None:
    ranks = [EpochBatchSampler(23, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3  # 11 per shard // 3, remainder dropped
    epoch0 = [[i for b in s for _, i in b] for s in ranks]
    assert len(set(epoch0[0]) | set(epoch0[1])) == 18  # disjoint, 9 each
    ranks[0].set_epoch(1)
    assert [i for b in ranks[0] for _, i in b] != epoch0[0]
    again = EpochBatchSampler(23, 3, seed=1, rank=0, world_size=2)
    full = list(again)
    again.set_epoch(0, start_batch=2)
    assert list(again) == full[2:] and len(again) == 1
    with pytest.raises(ValueError, match="shard"):
        EpochBatchSampler(23, 12, seed=1, rank=0, world_size=2)


def test_per_item_seeding_is_order_free_and_keeps_caller_rng() -> None:
    data = PerItemSeeded(ToyData(), seed=3)
    state = torch.get_rng_state()
    a, b, c = data[(0, 5)], data[(0, 5)], data[(1, 5)]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(torch.get_rng_state(), state)


def test_move_to_device_nested() -> None:
    t = torch.ones(2)
    out = move_to_device({"a": [t, (t, "s")], "b": 3}, torch.device("meta"))
    assert out["a"][0].is_meta and out["a"][1][0].is_meta and out["a"][1][1] == "s" and out["b"] == 3


def test_torchrun_two_processes(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name, p in r0["full"].items():
        assert torch.equal(p, r1["full"][name]), name  # DDP kept the replicas in sync
        assert torch.equal(p, r0["resumed"][name]) and torch.equal(p, r1["resumed"][name]), name
    for e in range(2):  # 40 samples, 2 ranks, batch 4: 5 steps per epoch, disjoint shards
        s0 = {i for b in r0["seen"][5 * e : 5 * e + 5] for i in b}
        s1 = {i for b in r1["seen"][5 * e : 5 * e + 5] for i in b}
        assert len(s0) == len(s1) == 20 and not s0 & s1
    ck = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    assert ck["step"] == 10 and ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert (tmp_path / "b" / "metrics.jsonl").exists()


def test_a_torn_last_log_line_is_dropped_with_a_warning(tmp_path, caplog):
    import logging

    from tocom.train.trainer import read_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with caplog.at_level(logging.WARNING, logger="tocom.train.trainer"):
        assert read_log(log) == [{"step": 1, "loss": 0.5}]
    assert "torn last line" in caplog.text

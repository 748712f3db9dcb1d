"""Compensator training: loss goes down, resume is exact, torchrun works, eval output schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from PIL import Image
from torch.utils.data import TensorDataset

import tocom
from tocom.compensator import Compensator, DistillObjective
from tocom.data import write_vtab
from tocom.models.loading import save_model
from tocom.train import TrainConfig, train

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4)


def toy_images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long))


def pair_losses(objective, images):
    """KL at every ordered pair of distinct degrees on a fixed batch."""
    losses = []
    model, plugin = objective.model, objective.plugin
    with torch.no_grad():
        for src in range(objective.max_r + 1):
            for tgt in range(objective.max_r + 1):
                if src == tgt:
                    continue
                teacher = model(images, r=src).log_softmax(-1)
                tokens, state = model.forward_tokens(images, r=tgt, qv_delta=plugin.live_delta(src, tgt))
                student = model.forward_head(tokens, size=state.size).log_softmax(-1)
                losses.append(torch.nn.functional.kl_div(student, teacher, reduction="batchmean",
                                                         log_target=True).item())
    return float(np.mean(losses))


def make_objective(seed=0):
    model = tiny_vit()
    with torch.no_grad():  # confident predictions, so that compression visibly changes them
        model.head.weight.mul_(200)
    torch.manual_seed(seed)
    plugin = Compensator.init_for(model, groups=4, rank=2, scale=1.0)
    return DistillObjective(model, plugin, max_r=4)


def test_distillation_lowers_the_loss(tmp_path):
    objective = make_objective()
    data = toy_images()
    probe = data.tensors[0][:16]  # random-noise images: nothing to generalise from, so probe the train set
    before = pair_losses(objective, probe)
    cfg = TrainConfig(steps=60, lr=1e-3, batch_size=16, weight_decay=0.0, progress=False, checkpoint_every=0)
    train(objective, data, cfg, out_dir=tmp_path)
    after = pair_losses(objective, probe)
    assert before > 0
    assert after < 0.8 * before, (before, after)
    # The backbone stayed frozen: only the plugin has gradients/params that moved.
    assert all(not p.requires_grad for p in objective.model.parameters())


def test_resumed_run_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(steps=6, lr=5e-3, batch_size=8, progress=False, checkpoint_every=1)
    full = make_objective()
    train(full, toy_images(32), cfg, out_dir=tmp_path / "full")
    killed = make_objective()
    train(killed, toy_images(32), cfg, out_dir=tmp_path / "split", stop_after=3)
    resumed = make_objective()  # a fresh process: the frozen backbone is rebuilt, plugin restored
    train(resumed, toy_images(32), cfg, out_dir=tmp_path / "split", resume=True)
    assert torch.equal(full.plugin.A, resumed.plugin.A)
    assert torch.equal(full.plugin.B, resumed.plugin.B)
    assert not torch.equal(killed.plugin.B, resumed.plugin.B)


def tiny_checkpoint(tmp_path: Path, num_classes=6) -> Path:
    model = tiny_vit(num_classes=num_classes)
    return save_model(model, tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)


def image_folder(tmp_path: Path, n=16) -> Path:
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path / "images"


def run_cli(*args, env=None, launcher=None):
    cmd = (launcher or [sys.executable, "-m", "tocom"]) + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_distill_cli_under_torchrun_two_processes(tmp_path):
    ckpt, data = tiny_checkpoint(tmp_path), image_folder(tmp_path)
    out = tmp_path / "p.tocom.safetensors"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                "-m", "tocom"]
    run_cli("distill", "vit_tiny_patch16_224", "--checkpoint", ckpt, "--data", data, "--max-r", "4",
            "--steps", "3", "--batch-size", "4", "--workers", "0", "--out", out, launcher=launcher)
    plugin = Compensator.load(out)
    assert plugin.spec.recipe["world_size"] == 2 and plugin.spec.recipe["steps"] == 3
    assert plugin.spec.groups == 4 and plugin.B.abs().sum() > 0  # trained: up-projections moved
    assert (tmp_path / "p.tocom.safetensors.run" / "last.ckpt").is_file()


def test_eval_cli_json_schema_and_scale_selection(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    data = tmp_path / "task"
    write_vtab("shape", data, seed=0, image_size=32, n_train=8, n_val=8, n_test=12)
    model = tocom.patch(tiny_vit(num_classes=6))
    plugin = Compensator.init_for(model, groups=4)
    with torch.no_grad():
        plugin.B.normal_(0, 0.05)
    plugin.save(tmp_path / "p.tocom.safetensors")
    out = run_cli("eval", "vit_tiny_patch16_224", "--checkpoint", ckpt, "--data", data, "--source", "0",
                  "--target", "0", "2", "--plugin", tmp_path / "p.tocom.safetensors", "--scale", "0.1", "0.5",
                  "--json", "--workers", "0")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == 2 + 2 * 2
    for row in rows:
        assert {"target", "source", "plugin", "scale", "accuracy", "throughput"} <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["throughput"] > 0
        assert isinstance(row["plugin"], bool)
    assert [r["scale"] for r in rows if not r["plugin"]] == [None, None]
    # At the source degree the plugin adds nothing: every row at 0 equals an evaluation that never
    # loads the plugin (a separate run, not the sweep's own no-plugin rows).
    plain = run_cli("eval", "vit_tiny_patch16_224", "--checkpoint", ckpt, "--data", data, "--target", "0",
                    "--json", "--workers", "0")
    plain_accuracy = json.loads(plain.strip().splitlines()[0])["accuracy"]
    assert [r["accuracy"] for r in rows if r["target"] == 0] == [plain_accuracy] * 3
    out = run_cli("eval", "vit_tiny_patch16_224", "--checkpoint", ckpt, "--data", data, "--target", "2",
                  "--plugin", tmp_path / "p.tocom.safetensors", "--scale", "0.1", "0.5",
                  "--select-scale-on", "val", "--json", "--workers", "0")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["split"] for r in rows] == ["test", "test"] and rows[1]["scale"] in (0.1, 0.5)


def test_eval_cli_errors(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, num_classes=2)
    data = tmp_path / "task"
    write_vtab("shape", data, seed=0, image_size=32, n_train=8, n_val=8, n_test=8)
    proc = subprocess.run([sys.executable, "-m", "tocom", "eval", "vit_tiny_patch16_224", "--checkpoint",
                           str(ckpt), "--data", str(data), "--workers", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "head has 2 classes" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tocom", "eval", "deit_small_patch16_224", "--checkpoint",
                           str(ckpt), "--data", str(data)], capture_output=True, text=True)
    assert proc.returncode == 2 and "was saved for vit_tiny_patch16_224" in proc.stderr
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"  # no metadata: the weights alone must be checked
    save_file({k: v.contiguous() for k, v in tiny_vit(num_classes=6).state_dict().items()}, bare)
    proc = subprocess.run([sys.executable, "-m", "tocom", "eval", "deit_small_patch16_224", "--checkpoint",
                           str(bare), "--data", str(data)], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not fit deit_small_patch16_224" in proc.stderr
    plugin = Compensator.init_for(tocom.patch(tiny_vit(num_classes=2)), groups=2)
    plugin.save(tmp_path / "p.tocom.safetensors")
    proc = subprocess.run([sys.executable, "-m", "tocom", "eval", "vit_tiny_patch16_224", "--checkpoint",
                           str(ckpt), "--data", str(data), "--plugin", str(tmp_path / "p.tocom.safetensors"),
                           "--target", "3", "--workers", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "outside this plugin's range 0..2" in proc.stderr


def test_run_distill_same_seed_same_plugin(tmp_path):
    """The seed fixes the plugin's random init too, not only the data order and degree pairs."""
    from tocom.jobs.distill import DistillConfig, run_distill

    ckpt, data = tiny_checkpoint(tmp_path), image_folder(tmp_path)
    plugins = [run_distill(DistillConfig("vit_tiny_patch16_224", data, checkpoint=str(ckpt), max_r=4, steps=2,
                                         batch_size=4, out=tmp_path / f"p{i}.tocom.safetensors",
                                         num_workers=0, seed=seed, progress=False))[0]
               for i, seed in enumerate((3, 3, 4))]
    assert torch.equal(plugins[0].A, plugins[1].A) and torch.equal(plugins[0].B, plugins[1].B)
    assert not torch.equal(plugins[0].A, plugins[2].A)


def test_holdout_curve_starts_at_the_loss_of_compression_alone(tmp_path):
    from tocom.data import eval_transform
    from tocom.jobs.distill import DistillConfig, LabelledFiles, run_distill
    from tocom.models.loading import create_model

    ckpt, images = tiny_checkpoint(tmp_path), image_folder(tmp_path, n=6)
    kwargs = dict(checkpoint=str(ckpt), max_r=4, steps=4, batch_size=4, out=tmp_path / "p.tocom.safetensors",
                  num_workers=0, progress=False, holdout=images, holdout_pairs=((0, 4),), eval_every=2)
    _, summary = run_distill(DistillConfig("vit_tiny_patch16_224", images, **kwargs))
    curve = summary["holdout_curve"]
    assert [point["step"] for point in curve] == [0, 2, 4]
    model = tocom.patch(create_model("vit_tiny_patch16_224", str(ckpt)).eval())  # no plugin at all
    held = LabelledFiles(images, eval_transform(model))
    x = torch.stack([held[i][0] for i in range(len(held))])
    with torch.no_grad():
        model.r = 0
        teacher = model(x).log_softmax(-1)
        model.r = 4
        student = model(x).log_softmax(-1)
    kl = torch.nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True).item()
    assert curve[0]["loss_0_to_4"] == pytest.approx(kl, rel=1e-4)
    assert curve[-1]["loss_0_to_4"] != curve[0]["loss_0_to_4"]  # the trained plugin changed it
    # a resume keeps the whole curve, compression alone included
    _, resumed = run_distill(DistillConfig("vit_tiny_patch16_224", images, **kwargs, resume=True))
    assert resumed["holdout_curve"] == curve


def test_distill_cli_records_the_holdout_curve_at_pairs_that_fit_max_r(tmp_path):
    ckpt, images = tiny_checkpoint(tmp_path), image_folder(tmp_path, n=6)
    out = tmp_path / "p.tocom.safetensors"
    run_cli("distill", "vit_tiny_patch16_224", "--checkpoint", ckpt, "--data", images, "--max-r", "4",
            "--steps", "2", "--batch-size", "4", "--workers", "0", "--holdout", images, "--eval-every", "1",
            "--out", out)
    curve = Compensator.load(out).spec.recipe["holdout_curve"]
    assert [point["step"] for point in curve] == [0, 1, 2]
    assert set(curve[0]) == {"step", "loss_0_to_4", "loss_4_to_0", "loss_0_to_2", "loss_2_to_4"}


def test_cross_entropy_distillation_refuses_images_without_labels(tmp_path):
    """Without labels.txt every image would be class 0 and the ``ce`` loss would learn just that."""
    from tocom.data import eval_transform
    from tocom.jobs.distill import DistillConfig, LabelledFiles, run_distill

    ckpt, images = tiny_checkpoint(tmp_path), image_folder(tmp_path, n=4)
    kwargs = dict(checkpoint=str(ckpt), max_r=2, steps=1, batch_size=2, num_workers=0, progress=False,
                  out=tmp_path / "p.tocom.safetensors", loss="ce")
    with pytest.raises(FileNotFoundError, match="labels.txt is missing"):
        run_distill(DistillConfig("vit_tiny_patch16_224", images, **kwargs))
    (images / "labels.txt").write_text("nested/0.png 3\nnested/1.png 5\n")
    with pytest.raises(ValueError, match="no label for 2 of 4 images"):
        run_distill(DistillConfig("vit_tiny_patch16_224", images, **kwargs))
    (images / "labels.txt").write_text("".join(f"nested/{i}.png {i}\n" for i in range(4)))
    run_distill(DistillConfig("vit_tiny_patch16_224", images, **kwargs))
    assert (tmp_path / "p.tocom.safetensors").is_file()
    labelled = LabelledFiles(images, eval_transform(tiny_vit()), require_labels=True)
    assert sorted(labelled[i][1] for i in range(4)) == [0, 1, 2, 3]
    assert LabelledFiles(images / "nested", None)[0][1] == 0  # no labels and none required: placeholder 0

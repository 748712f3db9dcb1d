"""PYRA as the paper trains it: Gaussian W_r, a frozen LayerNorm affine, and the modulators' own lr
(``modulator_lr``) on the shared warm-up / cosine schedule, recorded in the recipe."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from test_finetune import finetune
from torch.utils.data import TensorDataset

import tocom
from tocom.cli import main
from tocom.finetuned import checkpoint_metadata, load_model
from tocom.jobs.finetune import ClassifyObjective, add_method
from tocom.pyra import GAUSSIAN_STD, PyraModulator, add_pyra, pyra_parameters
from tocom.train import TrainConfig, train
from tocom.train.config import build_optimizer, lr_at

G = torch.Generator().manual_seed(0)
IMAGES, LABELS = torch.randn(16, 3, 32, 32, generator=G), torch.randint(0, 4, (16,), generator=G)



def pyra_lora_model() -> torch.nn.Module:
    model = tocom.patch(tiny_vit(num_classes=4, global_pool="avg"))
    model.r = 2
    add_method(model, "pyra", rank=4)
    return model


def modulators(model):
    return [blk.merge_modulator for blk in model.blocks]


def test_gaussian_init_by_default_and_identity_at_init():
    torch.manual_seed(0)
    mod = PyraModulator(16, 4096)
    assert mod.init == "gaussian" and not mod.w_d.any()
    assert abs(mod.w_r.std().item() - GAUSSIAN_STD) < 0.1 * GAUSSIAN_STD and abs(mod.w_r.mean()) < 2e-3
    uniform = PyraModulator(16, 4096, init="uniform")
    assert uniform.w_r.abs().max() <= 1 and abs(uniform.w_r.std().item() - 3 ** -0.5) < 0.05
    with pytest.raises(ValueError, match="unknown PYRA init"):
        PyraModulator(16, 4, init="kaiming")

    images = IMAGES[:4]
    for init in ("gaussian", "uniform"):
        model = tocom.patch(tiny_vit(global_pool="avg"))
        model.r = [3, 2, 2, 1]
        before = model(images)
        add_pyra(model, init=init)
        assert all(m.init == init for m in modulators(model))
        assert torch.equal(model(images), before)  # W_D = 0: exactly the ToMe model
    with pytest.raises(ValueError, match="unknown PYRA init"):
        add_pyra(model, init="normal")


def test_only_w_r_and_w_d_train_and_the_layernorm_stays_at_one_zero(tmp_path):
    model = pyra_lora_model()
    mods = modulators(model)
    assert pyra_parameters(model) == [p for m in mods for p in (m.w_r, m.w_d)]
    assert all(p.requires_grad for p in pyra_parameters(model))
    assert not any(p.requires_grad for m in mods for p in m.norm.parameters())
    w_r = [m.w_r.detach().clone() for m in mods]
    cfg = TrainConfig(steps=5, lr=3e-3, batch_size=8, weight_decay=0.05, progress=False, checkpoint_every=0)
    train(ClassifyObjective(model), TensorDataset(IMAGES, LABELS), cfg, out_dir=tmp_path)
    for m, start in zip(mods, w_r):
        assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
        assert torch.equal(m.norm.bias, torch.zeros_like(m.norm.bias))
        assert m.w_d.abs().sum() > 0 and not torch.equal(m.w_r, start)


def test_modulator_group_gets_its_lr_scale_and_no_decay():
    model = pyra_lora_model()
    cfg = TrainConfig(steps=10, lr=1e-3, batch_size=8, weight_decay=0.05)
    default = build_optimizer(ClassifyObjective(model), cfg).param_groups
    assert [g["lr_scale"] for g in default] == [1.0, 1.0]  # None: today's two groups
    groups = build_optimizer(ClassifyObjective(model, modulator_lr_scale=10.0), cfg).param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 10.0]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.0]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in pyra_parameters(model)}
    assert sum(len(g["params"]) for g in groups) == sum(len(g["params"]) for g in default)
    with pytest.raises(ValueError, match="no PYRA modulators"):
        ClassifyObjective(tiny_vit(), modulator_lr_scale=2.0)
    with pytest.raises(ValueError, match="> 0"):
        ClassifyObjective(model, modulator_lr_scale=0.0)


def test_modulator_lr_follows_the_schedule_and_is_recorded(vtab_task, tmp_path):
    lr = 1e-3
    finetune(vtab_task, tmp_path, lr=lr, modulator_lr=10 * lr, stop_after=1)
    ckpt = torch.load(tmp_path / "out.safetensors.run" / "last.ckpt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 10.0]
    # The first step is in warm-up (small preset: 1 epoch = 3 steps): both lrs are below their peaks.
    warm = lr_at(0, TrainConfig(steps=6, lr=lr, batch_size=4, warmup_steps=3))
    assert warm < lr and groups[0]["lr"] == pytest.approx(warm)
    assert groups[2]["lr"] / groups[0]["lr"] == pytest.approx(10.0)

    with pytest.raises(ValueError, match="cannot resume.*modulator_lr"):
        finetune(vtab_task, tmp_path, lr=lr, modulator_lr=5 * lr, resume=True)
    _, recipe = finetune(vtab_task, tmp_path, lr=lr, modulator_lr=10 * lr, resume=True)
    assert recipe["modulator_lr"] == 10 * lr and recipe["lr"] == lr
    assert json.loads(checkpoint_metadata(tmp_path / "out.safetensors")["recipe"])["modulator_lr"] == 10 * lr
    model = load_model("vit_tiny_patch16_224", tmp_path / "out.safetensors")
    assert all(torch.equal(m.norm.weight, torch.ones_like(m.norm.weight)) for m in modulators(model))


def test_modulator_lr_is_refused_without_pyra_or_when_not_positive(vtab_task, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs method='pyra'"):
        finetune(vtab_task, tmp_path, method="lora", modulator_lr=1e-2)
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="modulator_lr must be a finite number > 0"):
            finetune(vtab_task, tmp_path, modulator_lr=bad)
    with pytest.raises(SystemExit):
        main(["finetune", "vit_tiny_patch16_224", "--data", str(vtab_task), "--method", "lora",
              "--modulator-lr", "1e-2", "--out", str(tmp_path / "no.safetensors")])
    assert "needs method='pyra'" in capsys.readouterr().err

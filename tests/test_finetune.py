"""Fine-tuning under compression: each method learns, LoRA folds exactly, resume is exact, and the
``tocom finetune`` output loads in ``tocom eval`` and ``tocom bench``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from safetensors.torch import load_file
from test_distill import tiny_checkpoint
from torch.utils.data import TensorDataset

import tocom
from tocom.cli import main
from tocom.finetuned import checkpoint_metadata, load_model
from tocom.jobs.finetune import ClassifyObjective, FinetuneConfig, add_method, run_finetune
from tocom.peft import add_lora, fold
from tocom.pyra import add_pyra
from tocom.train import TrainConfig, train

FINETUNE_METHODS = ("full", "lora", "adaptformer", "pyra")
G = torch.Generator().manual_seed(0)
IMAGES, LABELS = torch.randn(32, 3, 32, 32, generator=G), torch.randint(0, 4, (32,), generator=G)



def tuned(method: str, r=2) -> torch.nn.Module:
    model = tocom.patch(tiny_vit(num_classes=4, global_pool="avg"))
    model.r = r
    add_method(model, method, rank=4)
    return model


def loss_on_data(model) -> float:
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model.eval()(IMAGES), LABELS).item()


@pytest.mark.parametrize("method", FINETUNE_METHODS)
def test_a_few_steps_lower_the_loss(method, tmp_path):
    model = tuned(method)
    before = loss_on_data(model)
    cfg = TrainConfig(steps=15, lr=3e-4 if method == "full" else 3e-3, batch_size=8, weight_decay=0.0,
                      progress=False, checkpoint_every=0)
    train(ClassifyObjective(model), TensorDataset(IMAGES, LABELS), cfg, out_dir=tmp_path)
    assert loss_on_data(model) < 0.9 * before
    if method == "pyra":  # its modulators trained too, and now change the outputs
        assert all(blk.merge_modulator.w_d.abs().sum() > 0 for blk in model.blocks)


def test_lora_fold_gives_the_same_outputs():
    model = tocom.patch(tiny_vit(global_pool="avg"))
    model.r = 2
    add_pyra(add_lora(model, rank=4))  # LoRA folds, PYRA stays
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 3 or p.shape == (64,) and not p.any():  # LoRA A/B and PYRA W_D: move off init
                p.normal_(0, 0.1)
    unfolded = model(IMAGES[:4])
    folded = fold(model)(IMAGES[:4])
    assert not any("lora" in k for k in model.state_dict())
    assert torch.allclose(unfolded, folded, atol=1e-5)


def finetune(vtab_task, tmp_path, stop_after=None, **kw):
    args = dict(method="pyra", r="2", epochs=2, batch_size=4, num_workers=0, progress=False,
                out=tmp_path / "out.safetensors")
    args.update(kw)
    if "checkpoint" not in args:  # (setdefault would rewrite a caller's file of the same name)
        args["checkpoint"] = tiny_checkpoint(tmp_path)
    return run_finetune(FinetuneConfig("vit_tiny_patch16_224", vtab_task, **args), stop_after=stop_after)


def test_resumed_finetune_equals_uninterrupted(vtab_task, tmp_path):
    full, full_recipe = finetune(vtab_task, tmp_path / "a")
    killed, _ = finetune(vtab_task, tmp_path / "b", stop_after=3)
    assert not (tmp_path / "b" / "out.safetensors").exists()  # no output before the last step
    resumed, recipe = finetune(vtab_task, tmp_path / "b", resume=True)
    a, b = load_file(tmp_path / "a" / "out.safetensors"), load_file(tmp_path / "b" / "out.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in killed.state_dict().items())
    assert recipe["steps_done"] == recipe["steps"] == 6
    # the validation curve keeps the point made before the interruption
    assert [step for step, _ in recipe["curve"]] == [3, 6]
    assert recipe["curve"] == full_recipe["curve"]


def test_new_head_metadata_and_refused_schedules(vtab_task, tmp_path):
    model, recipe = finetune(vtab_task, tmp_path, checkpoint=tiny_checkpoint(tmp_path, num_classes=10),
                             method="adaptformer", r="1,2", epochs=1)
    assert recipe["new_head"] and model.num_classes == 6 and recipe["val_acc"] is not None
    meta = checkpoint_metadata(tmp_path / "out.safetensors")
    assert meta["method"] == "adaptformer" and meta["num_classes"] == "6"
    assert json.loads(meta["schedule"]) == [1, 2, 0, 0] and json.loads(meta["source_degree"]) is None
    assert json.loads(meta["peft"]) == {"bottleneck": 32, "scale": 0.1}
    with pytest.raises(ValueError, match="clamped at block 1"):
        finetune(vtab_task, tmp_path, r="8", method="pyra")  # PYRA's weights are per pair: never clamp
    clamped, _ = finetune(vtab_task, tmp_path, r="8", method="full", epochs=1)  # ToMe clamps as defined
    assert clamped.effective_schedule() == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="pass method="):
        finetune(vtab_task, tmp_path, method=None)
    plain = load_model("vit_tiny_patch16_224", tiny_checkpoint(tmp_path))
    assert not tocom.models.is_patched(plain)  # plain checkpoints load as the timm model


@pytest.mark.parametrize("method", FINETUNE_METHODS)
def test_cli_finetune_then_eval(method, vtab_task, tmp_path, capsys):
    out = tmp_path / f"{method}.safetensors"
    main(["finetune", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint(tmp_path)), "--data",
          str(vtab_task), "--method", method, "--r", "2", "--epochs", "1", "--batch-size", "4", "--rank", "2",
          "--lora-targets", "qv", "--workers", "0", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    main(["eval", "vit_tiny_patch16_224", "--checkpoint", str(out), "--data", str(vtab_task),
          "--target", "0", "2", "--json", "--workers", "0"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(row["target"], row["source"]) for row in rows] == [(0, 2), (2, 2)]  # source from metadata
    if method == "pyra":  # bench times the stock model and the fine-tuned one at its schedule
        main(["bench", "vit_tiny_patch16_224", "--checkpoint", str(out), "--r", "2", "--rounds", "1",
              "--batch-size", "2", "--json"])
        assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_finetune_under_evit_records_it_and_loads_pruning(vtab_task, tmp_path, capsys):
    out = tmp_path / "evit.safetensors"
    main(["finetune", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint(tmp_path)), "--data",
          str(vtab_task), "--method", "adaptformer", "--compression", "evit", "--r", "2", "--epochs", "1",
          "--batch-size", "4", "--workers", "0", "--out", str(out)])
    assert checkpoint_metadata(out)["compression"] == "evit"
    model = load_model("vit_tiny_patch16_224", out)
    assert model._tocom.method == "evit"
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.last_state.tokens[-1] == 17 - 2 * len(model.blocks)  # pruned r = 2 per block
    with pytest.raises(ValueError, match="PYRA modulates token merging"):
        run_finetune(FinetuneConfig("vit_tiny_patch16_224", vtab_task, checkpoint=tiny_checkpoint(tmp_path),
                                    method="pyra", compression="evit", out=tmp_path / "no.safetensors",
                                    num_workers=0, progress=False))

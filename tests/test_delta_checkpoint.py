"""Delta checkpoints: a fine-tune stored as what differs from its base, loaded back whole."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_vit

from tocom.cli import main
from tocom.finetuned import checkpoint_metadata, finetune_metadata, load_model
from tocom.models.loading import read_state_dict, save_model
from tocom.peft import add_adaptformer

NAME = "vit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=5)


@pytest.fixture
def adapted(tmp_path):
    """A base checkpoint and an AdaptFormer fine-tune of it (frozen backbone, new adapters and head)."""
    base = tiny_vit()
    save_model(base, tmp_path / "base.safetensors", NAME, KWARGS)
    model = tiny_vit()
    add_adaptformer(model, bottleneck=4, scale=0.1)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter" in name or name.startswith("head"):
                p.add_(torch.randn_like(p))  # trained: differs from the base (adapter up starts at 0)
    meta = finetune_metadata("adaptformer", [0] * 4, {"bottleneck": 4, "scale": 0.1}, {}, {})
    save_model(model, tmp_path / "full.safetensors", NAME, KWARGS, meta)
    return tmp_path, model


def test_delta_keeps_only_what_changed_and_loads_back_whole(adapted, capsys):
    folder, model = adapted
    main(["delta", str(folder / "full.safetensors"), "--base", str(folder / "base.safetensors"),
          "--out", str(folder / "delta.safetensors")])
    assert "differ from" in capsys.readouterr().out
    raw_keys = set(json.loads(checkpoint_metadata(folder / "delta.safetensors")["delta_keys"]))
    full_state, _ = read_state_dict(folder / "full.safetensors")
    assert raw_keys == set(full_state)
    from safetensors import safe_open

    with safe_open(str(folder / "delta.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert stored and all("adapter" in k or k.startswith("head") for k in stored)  # the backbone is not
    assert (folder / "delta.safetensors").stat().st_size < (folder / "full.safetensors").stat().st_size / 2
    state, meta = read_state_dict(folder / "delta.safetensors")
    assert meta["method"] == "adaptformer" and not any(k.startswith("delta_") for k in meta)  # whole now
    assert set(state) == set(full_state) and all(torch.equal(state[k], full_state[k]) for k in state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = load_model(NAME, folder / "full.safetensors")(x)
        torch.testing.assert_close(load_model(NAME, folder / "delta.safetensors")(x), expected)


def test_delta_finds_its_base_beside_it_and_refuses_a_wrong_one(adapted, tmp_path_factory):
    folder, _ = adapted
    main(["delta", str(folder / "full.safetensors"), "--base", str(folder / "base.safetensors"),
          "--out", str(folder / "delta.safetensors")])
    moved = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(folder / "delta.safetensors", moved / "delta.safetensors")
    (folder / "base.safetensors").rename(folder / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match="put that base checkpoint next to the delta"):
        read_state_dict(moved / "delta.safetensors")
    other = tiny_vit()
    with torch.no_grad():
        other.head.weight.add_(1.0)
    save_model(other, moved / "base.safetensors", NAME, KWARGS)  # right name, wrong content
    with pytest.raises(FileNotFoundError, match="no file with that content"):
        read_state_dict(moved / "delta.safetensors")
    shutil.copy(folder / "gone.safetensors", moved / "base.safetensors")  # the real base, beside it
    state, _ = read_state_dict(moved / "delta.safetensors")
    assert torch.equal(state["blocks.0.attn.qkv.weight"], tiny_vit().state_dict()["blocks.0.attn.qkv.weight"])


def test_a_rebuilt_delta_is_a_plain_state_dict_and_bad_outputs_are_refused(adapted):
    from tocom.models.loading import write_delta

    folder, _ = adapted
    full, base, delta = (folder / f"{n}.safetensors" for n in ("full", "base", "delta"))
    first = write_delta(full, base, delta)
    state, _ = read_state_dict(delta)
    pointers = [t.data_ptr() for t in state.values()]
    assert len(set(pointers)) == len(pointers)  # equal base tensors (unit norms) are not one object
    again = folder / "again.safetensors"
    save_model(load_model(NAME, delta), again, NAME, KWARGS, checkpoint_metadata(full))
    second = write_delta(again, base, folder / "delta2.safetensors")  # from a rebuilt delta
    assert second["kept"] == first["kept"] < first["total"]  # the same tensors differ as the first time
    with pytest.raises(ValueError, match="name it"):
        write_delta(full, base, folder / "delta.pth")
    with pytest.raises(ValueError, match="overwrite its own base"):
        write_delta(full, base, base)

"""Fine-tuning ``hf:`` models: peft's LoRA (only LoRA and the head train, merging keeps the logits),
tocom's AdaptFormer in HF layers, training under compression, and both output formats."""

from __future__ import annotations

import json

import pytest
import torch
from test_hf_cli import tiny_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import tocom  # noqa: E402
from tocom.cli import main  # noqa: E402
from tocom.data import load_dataset  # noqa: E402
from tocom.finetuned import checkpoint_metadata  # noqa: E402
from tocom.jobs.finetune import FinetuneConfig, run_finetune  # noqa: E402
from tocom.models.hf_load import load_hf  # noqa: E402
from tocom.peft.hf import add_hf_adaptformer, add_hf_lora, load_finetuned_hf, merge_hf_lora  # noqa: E402

G = torch.Generator().manual_seed(0)
IMAGES = torch.randn(4, 3, 32, 32, generator=G)


@pytest.fixture
def folder(tmp_path):
    return tiny_folder(tmp_path / "tiny-vit")


def finetune(folder, task, tmp_path, **kw):
    args = dict(method="lora", r="2", epochs=1, batch_size=4, num_workers=0, progress=False, rank=2,
                lora_targets=("q", "v"), out=tmp_path / "out.safetensors", lr=1e-2)
    args.update(kw)
    return run_finetune(FinetuneConfig(f"hf:{folder}", task, **args))


def test_peft_lora_trains_only_lora_and_head_and_merges_exactly(folder):
    model = tocom.patch(load_hf(f"hf:{folder}"))
    model.r = 2
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_hf_lora(model, rank=2, targets=("q", "v"))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".classifier." in n for n in trainable)
    # names end in q_proj.lora_A.default.weight
    assert {n.split(".")[-4] for n in trainable if "lora_" in n} == {"q_proj", "v_proj"}
    with torch.no_grad():
        unchanged = lora(IMAGES)
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(2):  # two steps move LoRA's B off zero
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(lora(IMAGES), labels).backward()
        optimizer.step()
    with torch.no_grad():
        before_merge = lora(IMAGES)
        merged = merge_hf_lora(lora)
        after_merge = merged(IMAGES)
    assert not torch.allclose(before_merge, unchanged, atol=1e-4)  # training changed the outputs
    assert not any("lora" in k for k in merged.state_dict())
    # W + B A folded once against x W + (x A) B every call: equal up to float rounding
    assert torch.allclose(after_merge, before_merge, atol=1e-5)
    frozen = [k for k in base if "classifier" not in k and "q_proj" not in k and "v_proj" not in k]
    assert all(torch.equal(merged.state_dict()[k], base[k]) for k in frozen)


def test_adaptformer_in_hf_layers_starts_as_identity_and_matches_by_hand(folder):
    model = load_hf(f"hf:{folder}")
    with torch.no_grad():
        plain = model(IMAGES)
        add_hf_adaptformer(model, bottleneck=4, scale=0.5)
        assert torch.equal(model(IMAGES), plain)  # W_up starts at zero
        layer = model.vit.layers[0]
        layer.mlp.adapter.up.weight.normal_(0, 0.1)
        x = torch.randn(2, 17, 32, generator=G)
        adapter = layer.mlp.adapter
        hidden = torch.relu(x @ adapter.down.weight.T + adapter.down.bias)
        by_hand = layer.mlp.mlp(layer.mlp.norm(x)) + 0.5 * (hidden @ adapter.up.weight.T + adapter.up.bias)
        assert torch.allclose(layer.mlp(x), by_hand, atol=1e-6)
        patched = tocom.patch(model)  # tocom's reducing layer forward uses the same slots
        assert torch.allclose(patched(IMAGES), model(IMAGES))
        assert tocom.dims_of(patched).mlp_hidden == 64  # the MLP's width is read through the adapter


def test_out_format_hf_loads_in_plain_transformers_with_the_same_logits(folder, vtab_task, tmp_path):
    out = tmp_path / "tuned-hf"
    model, recipe = finetune(folder, vtab_task, tmp_path, out=out, out_format="hf")
    assert recipe["steps_done"] == 3 and recipe["method"] == "lora"
    plain = transformers.ViTForImageClassification.from_pretrained(out).eval()
    assert plain.config.id2label == dict(enumerate(load_dataset(vtab_task, "train").classes))
    model.r = 0  # plain transformers runs without token reduction
    with torch.no_grad():
        assert torch.allclose(plain(pixel_values=IMAGES).logits, model(IMAGES), atol=1e-5)
    original = transformers.ViTForImageClassification.from_pretrained(folder)
    before, after = original.vit.layers[0].attention, plain.vit.layers[0].attention
    assert not torch.equal(before.q_proj.weight, after.q_proj.weight)  # LoRA on q and v was merged
    assert torch.equal(before.k_proj.weight, after.k_proj.weight)


@pytest.mark.parametrize("method", ["lora", "adaptformer", "full"])
def test_tocom_format_reloads_under_compression(method, folder, vtab_task, tmp_path):
    model, recipe = finetune(folder, vtab_task, tmp_path, method=method)
    meta = checkpoint_metadata(tmp_path / "out.safetensors")
    assert meta["method"] == method and json.loads(meta["schedule"]) == [2, 2]  # trained at r = 2
    assert meta["hf_architecture"] == "ViTForImageClassification"
    reloaded = tocom.patch(load_finetuned_hf(f"hf:{folder}", str(tmp_path / "out.safetensors")))
    reloaded.r = 2
    with torch.no_grad():
        assert torch.allclose(reloaded(IMAGES), model(IMAGES), atol=1e-6)


def test_cli_finetune_then_eval(folder, vtab_task, tmp_path, capsys):
    out = tmp_path / "af.safetensors"
    main(["finetune", f"hf:{folder}", "--data", str(vtab_task), "--method", "adaptformer", "--r", "2",
          "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    main(["eval", f"hf:{folder}", "--checkpoint", str(out), "--data", str(vtab_task), "--target", "0", "2",
          "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(row["target"], row["source"]) for row in rows] == [(0, 2), (2, 2)]  # source from metadata


def test_resumed_lora_finetune_equals_uninterrupted(folder, vtab_task, tmp_path):
    from safetensors.torch import load_file

    finetune(folder, vtab_task, tmp_path, epochs=2, out=tmp_path / "b" / "out.safetensors")
    # a run killed after 3 of its 6 steps, then resumed: peft's LoRA state comes back exactly
    killed = FinetuneConfig(f"hf:{folder}", vtab_task, method="lora", r="2", epochs=2, batch_size=4,
                            num_workers=0, progress=False, rank=2, lora_targets=("q", "v"), lr=1e-2,
                            out=tmp_path / "c" / "out.safetensors")
    run_finetune(killed, stop_after=3)
    assert not (tmp_path / "c" / "out.safetensors").exists()
    run_finetune(FinetuneConfig(**{**vars(killed), "resume": True}))
    a, c = load_file(tmp_path / "b" / "out.safetensors"), load_file(tmp_path / "c" / "out.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)

"""Label-free adaptation of a plugin to one fine-tuned model (tocom adapt)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import random_plugin, tiny_vit
from PIL import Image

import tocom
import tocom.jobs.adapt as adapt_job
from tocom.compensator import Compensator
from tocom.compensator.adapt import AdaptObjective, kl_to_teacher
from tocom.data import preprocessing_record
from tocom.finetuned import finetune_metadata, load_model
from tocom.jobs.adapt import AdaptConfig, adapt, run_adapt
from tocom.models.loading import save_model
from tocom.peft import add_adaptformer

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=5)
IMAGES = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
QUICK = AdaptConfig(steps=24, batch_size=8, lr=3e-3, eval_every=8, eval_targets=(2, 4, 8), progress=False,
                    checkpoint_every=4)


def finetuned(source: int = 0, seed: int = 1) -> torch.nn.Module:
    """A tiny AdaptFormer model with random adapters (a stand-in for a fine-tune at ``source``)."""
    model = tocom.patch(tiny_vit(num_classes=5))
    model.r = source
    add_adaptformer(model, bottleneck=8, scale=0.5)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaptformer" in name or "head" in name:
                p.normal_(0, 0.2)
    return model.eval()


def finetuned_file(tmp_path, source: int = 0):
    model = finetuned(source)
    meta = finetune_metadata("adaptformer", [source] * 4, {"bottleneck": 8, "scale": 0.5},
                             {"augment": "squash"}, preprocessing_record("squash", model))
    return save_model(model, tmp_path / "ft.safetensors", "vit_tiny_patch16_224",
                      {k: v for k, v in TINY.items() if k != "num_classes"}, metadata=meta)


def universal(model) -> Compensator:
    torch.manual_seed(5)  # A's random init comes from the global generator
    return random_plugin(model, groups=8)


def held_out_kl(model, plugin, source, targets):
    """KL to the model at its source on the held-out images (every 10th), through attach and the fold:
    another path to the score than the objective's per-call delta."""
    held = IMAGES[::10]
    with torch.no_grad():
        teacher = model(held, r=source)
        tocom.attach(model, plugin, source=source)
        scores = {}
        for t in targets:
            tocom.set_degree(model, t)
            scores[t] = float(kl_to_teacher(model(held), teacher))
        tocom.detach(model)
    return scores


def test_adaptation_lowers_held_out_kl_and_leaves_the_model_alone(tmp_path):
    model = finetuned()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = universal(model)
    given = (plugin.A.clone(), plugin.B.clone())
    adapted = adapt(model, plugin, IMAGES, source=0, config=QUICK, run_dir=tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # weights, adapters and head are never trained
    assert torch.equal(plugin.A, given[0]) and torch.equal(plugin.B, given[1])  # the input stays as given
    record = adapted.spec.adapted
    assert record["source"] == 0 and record["images"] == 40 and record["held_out"] == 4
    assert record["weights_sha256"] == tocom.models.weights_fingerprint(model)
    assert record["picked_step"] > 0 and not torch.equal(adapted.B, plugin.B)
    before, after = held_out_kl(model, plugin, 0, (2, 4, 8)), held_out_kl(model, adapted, 0, (2, 4, 8))
    for t in (2, 4, 8):  # the recorded scores are the ones the folded plugin gives, and no worse
        assert record["held_out_kl"]["adapted"][str(t)] == pytest.approx(after[t], rel=1e-4, abs=1e-7)
        assert record["held_out_kl"]["universal"][str(t)] == pytest.approx(before[t], rel=1e-4, abs=1e-7)
        assert after[t] <= before[t] * (1 + QUICK.tolerance) + 1e-7
    assert sum(after.values()) < 0.9 * sum(before.values())


def test_a_plugin_worse_on_held_out_images_is_never_returned(tmp_path):
    model = finetuned()
    plugin = universal(model)
    config = AdaptConfig(**{**QUICK.__dict__, "lr": 5.0})  # diverges: every evaluation is worse
    adapted = adapt(model, plugin, IMAGES, source=0, config=config, run_dir=tmp_path)
    assert adapted.spec.adapted["picked_step"] == 0
    assert torch.equal(adapted.A, plugin.A) and torch.equal(adapted.B, plugin.B)  # the universal one, copied


def test_the_objective_draws_only_pairs_from_the_source():
    model = finetuned(source=4)
    objective = AdaptObjective(model, universal(model), source=4)
    assert objective.targets == [0, 1, 2, 3, 5, 6, 7, 8]
    seen = {int(objective((IMAGES[:2], torch.zeros(2, 5)))[1]["tgt"]) for _ in range(60)}
    assert 4 not in seen and len(seen) > 4


def test_a_killed_adaptation_resumes_to_the_same_plugin(tmp_path, monkeypatch):
    model = finetuned()
    full = adapt(model, universal(model), IMAGES, source=0, config=QUICK, run_dir=tmp_path / "a")
    real_train = adapt_job.train

    def killed(*args, **kwargs):
        real_train(*args, **kwargs, stop_after=12)
        raise KeyboardInterrupt

    monkeypatch.setattr(adapt_job, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        adapt(model, universal(model), IMAGES, source=0, config=QUICK, run_dir=tmp_path / "b")
    monkeypatch.setattr(adapt_job, "train", real_train)
    resumed = adapt(model, universal(model), IMAGES, source=0, config=QUICK, run_dir=tmp_path / "b",
                    resume=True)
    assert torch.equal(full.A, resumed.A) and torch.equal(full.B, resumed.B)
    assert full.spec.adapted["curve"] == resumed.spec.adapted["curve"]


def test_attach_warns_once_when_the_weights_are_not_the_adapted_ones(tmp_path):
    model = finetuned()
    adapted = adapt(model, universal(model), IMAGES, source=0, config=QUICK, run_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tocom.attach(model, adapted, source=0)  # its own model: silent
    tocom.detach(model)
    other = finetuned(seed=2)
    with pytest.warns(UserWarning, match="adapted to another model") as caught:
        tocom.attach(other, adapted, source=0)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    tocom.detach(other)
    with pytest.warns(UserWarning, match="adapted to source degree 0, not 2"):
        tocom.attach(model, adapted, source=2)


def image_folder(root, n=30, size=40):
    rng = np.random.default_rng(0)
    (root / "a" / "b").mkdir(parents=True)
    for i in range(n):
        where = root / "a" / "b" if i % 2 else root
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(where / f"{i:03d}.png")
    (root / "labels.txt").write_text("this file is never read\n")
    return root


def test_run_adapt_writes_a_plugin_that_records_what_it_was_adapted_to(tmp_path):
    checkpoint = finetuned_file(tmp_path, source=0)
    plugin_file = tmp_path / "universal.tocom.safetensors"
    model = load_model("vit_tiny_patch16_224", checkpoint)
    universal(model).save(plugin_file)
    data = image_folder(tmp_path / "images")
    out = tmp_path / "adapted.tocom.safetensors"
    _, record = run_adapt("vit_tiny_patch16_224", checkpoint, plugin_file, data, out, QUICK)
    loaded = Compensator.load(out)
    assert loaded.spec.adapted == json.loads(json.dumps(record))
    assert record["images"] == 30 and record["source"] == 0 and len(record["checkpoint_sha256"]) == 64
    assert record["recipe"]["steps"] == 24 and record["recipe"]["lr"] == QUICK.lr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same checkpoint loaded again: the same fingerprint
        tocom.attach(load_model("vit_tiny_patch16_224", checkpoint), loaded, source=0)
    # the image list's hash follows the images' content
    (data / "000.png").write_bytes((data / "001.png").read_bytes() if (data / "001.png").exists()
                                   else (data / "a" / "b" / "001.png").read_bytes())
    files = sorted(p for p in data.rglob("*.png"))
    assert adapt_job.image_list_sha256(data, files) != record["images_sha256"]


def test_bad_input_is_refused_with_one_line(tmp_path):
    checkpoint = finetuned_file(tmp_path)
    plugin_file = tmp_path / "universal.tocom.safetensors"
    universal(load_model("vit_tiny_patch16_224", checkpoint)).save(plugin_file)
    data = image_folder(tmp_path / "images", n=4)
    run = lambda **kw: run_adapt(**{"model_name": "vit_tiny_patch16_224", "checkpoint": checkpoint,  # noqa: E731
                                    "plugin_file": plugin_file, "data": data,
                                    "out": tmp_path / "o.tocom.safetensors", "config": QUICK, **kw})
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images under"):
        run(data=tmp_path / "empty")
    plain = save_model(tiny_vit(num_classes=5), tmp_path / "plain.safetensors", "vit_tiny_patch16_224",
                       {k: v for k, v in TINY.items() if k != "num_classes"})
    with pytest.raises(ValueError, match="not a fine-tuned checkpoint"):
        run(checkpoint=plain)
    other = tmp_path / "other.tocom.safetensors"
    random_plugin(tiny_vit(embed_dim=32, num_heads=2)).save(other)
    with pytest.raises(ValueError, match="does not fit"):
        run(plugin_file=other)
    evit = tmp_path / "evit.tocom.safetensors"
    random_plugin(tiny_vit(), method="evit").save(evit)
    with pytest.raises(ValueError, match="compensates evit"):
        run(plugin_file=evit)
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        run()


def test_the_command_line_adapts_and_refuses_in_one_line(tmp_path, capsys):
    from tocom.cli import main

    checkpoint = finetuned_file(tmp_path)
    plugin_file = tmp_path / "universal.tocom.safetensors"
    universal(load_model("vit_tiny_patch16_224", checkpoint)).save(plugin_file)
    data = image_folder(tmp_path / "images", n=12)
    out = tmp_path / "adapted.tocom.safetensors"
    args = ["adapt", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--plugin", str(plugin_file),
            "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "4", "--eval-every", "2"]
    main(args)
    assert f"wrote {out}" in capsys.readouterr().out
    assert Compensator.load(out).spec.adapted["steps"] == 4
    with pytest.raises(SystemExit):
        main(args[:6] + ["--data", str(tmp_path / "nowhere")] + args[8:])
    err = capsys.readouterr().err.strip()
    assert err.startswith("tocom adapt: error:") and "nowhere" in err and "\n" not in err

"""Dense mode: merge before each MLP, unmerge after it. Exact at r = 0, equal to a naive reference
at r > 0, its FLOPs counted by hand, and dense plugins that record their mode."""

from __future__ import annotations

import pytest
import timm
import torch
from reference_dense import naive_dense_tokens
from reference_tome import naive_merge

import tocom
from tocom.compensator import Compensator, DistillObjective
from tocom.compress import bipartite_matching, dense_clamp, dense_unmerge, merge_wavg
from tocom.seg import Segmenter

ARCH = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    args = {**ARCH, "num_classes": 0, **kwargs}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 5, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_r0_is_bit_identical(kwargs):
    model = vit(**kwargs)
    with torch.no_grad():
        tokens, out = model.forward_features(IMAGES), model(IMAGES)
        tocom.patch(model, mode="dense")
        assert torch.equal(model.forward_features(IMAGES), tokens) and torch.equal(model(IMAGES), out)


@pytest.mark.parametrize("schedule", [[2, 4, 8], [8, 8, 8], [1, 0, 5]])
def test_matches_naive_reference(schedule):
    model = tocom.patch(vit(), mode="dense")
    model.r = schedule
    with torch.no_grad():
        out = model.forward_features(IMAGES)
        ref = naive_dense_tokens(model, IMAGES, schedule)
    assert out.shape == (2, 17, 32) and model.last_state.tokens == [17, 17, 17]
    assert torch.allclose(out, ref, atol=1e-5)
    plain = tocom.unpatch(model).forward_features(IMAGES)
    assert not torch.allclose(out, plain, atol=1e-3)  # merging changed something


def test_unmerge_copies_each_group_output():
    g = torch.Generator().manual_seed(0)
    metric, x = torch.randn(1, 11, 6, generator=g), torch.randn(1, 11, 4, generator=g)
    plan = bipartite_matching(metric, 4, num_prefix=1)
    merged, _ = merge_wavg(plan, x, None)
    _, _, groups = naive_merge(metric[0], x[0], torch.ones(11), 4, 1)
    full = dense_unmerge(plan, merged, 11)[0]
    for row, members in enumerate(groups):
        for m in members:
            assert torch.equal(full[m], merged[0, row])


def test_dense_clamp_and_flops_by_hand():
    # Each block merges from the full sequence: 17 tokens, 1 prefix -> at most 8 per block.
    assert dense_clamp([20, 8, 3], 17, 1) == [8, 8, 3]
    model = tocom.patch(vit(), mode="dense")
    report = tocom.schedule_report(model, [20, 8, 3])
    n, d, h = 17, 32, 128
    attention = n * d * 3 * d + 2 * n * n * d + n * d * d  # all blocks see all 17 tokens
    mlp = sum(2 * (n - r) * d * h for r in (8, 8, 3))
    embed = 16 * 8 * 8 * 3 * d
    assert report["schedule"] == [8, 8, 3] and report["mlp_tokens"] == [9, 9, 14]
    assert report["tokens"] == [17] * 3 and report["mode"] == "dense"
    assert report["gflops"] * 1e9 == pytest.approx(embed + 3 * attention + mlp)
    standard = tocom.schedule_report(model, [8, 8, 3], mode="standard")
    assert standard["gflops"] < report["gflops"]  # standard mode also shortens attention


def test_refusals():
    with pytest.raises(ValueError, match="prunes tokens.*method='tome'"):
        tocom.patch(vit(), "evit", mode="dense")
    with pytest.raises(ValueError, match="mode must be one of"):
        tocom.patch(vit(), mode="sparse")


def test_segmenter_gets_a_token_per_patch_and_trains():
    model = Segmenter(tocom.patch(vit(), mode="dense"), 3)
    model.backbone.r = 6
    logits = model(IMAGES)
    assert logits.shape == (2, 3, 32, 32)
    logits.square().mean().backward()
    assert model.backbone.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_plugin_records_mode_and_mismatch_is_refused(tmp_path):
    model = vit()
    plugin = Compensator.init_for(model, groups=4, rank=2, mode="dense")
    plugin.save(tmp_path / "p.tocom.safetensors")
    loaded = Compensator.load(tmp_path / "p.tocom.safetensors")
    assert loaded.spec.mode == "dense" and "mode=dense" in repr(loaded)
    with pytest.raises(ValueError, match="distilled in dense mode but the model is patched in standard"):
        tocom.attach(tocom.patch(vit()), loaded, source=0)
    with pytest.raises(ValueError, match="distilled in standard mode but the model is patched in dense"):
        tocom.attach(tocom.patch(vit(), mode="dense"), Compensator.init_for(model, groups=4), source=0)
    attached = tocom.attach(vit(), loaded, source=0)  # unpatched: patched in the plugin's mode
    assert attached._tocom.mode == "dense"


def test_dense_distillation_is_l1_on_every_token():
    model = vit(num_classes=5)  # a head is present, yet dense plugins distil per-token features
    plugin = Compensator.init_for(model, groups=4, rank=2, mode="dense")
    with torch.no_grad():
        plugin.B.normal_(0, 0.05)  # a non-zero delta, so the student differs from r alone
    objective = DistillObjective(model, plugin, loss="kd")
    loss = objective.pair_loss(IMAGES, torch.zeros(2, dtype=torch.long), 0, 4)
    # independently: teacher tokens at r=0, student tokens at r=4 with delta(0 -> 4) folded in
    check = tocom.patch(vit(num_classes=5), mode="dense")
    with torch.no_grad():
        teacher = check.forward_features(IMAGES)
        tocom.attach(check, plugin, source=0)
        tocom.set_degree(check, 4)
        student = check.forward_features(IMAGES)
    assert loss.item() == pytest.approx((student - teacher).abs().mean().item(), rel=1e-4)
    loss.backward()
    assert plugin.B.grad.abs().sum() > 0


def test_attached_dense_plugin_pins_the_mode_and_serves_per_call_degrees():
    model = vit()
    plugin = Compensator.init_for(model, groups=4, rank=2, mode="dense")
    with torch.no_grad():
        plugin.B.normal_(0, 0.05)
    tocom.attach(model, plugin, source=0)
    with pytest.raises(ValueError, match="distilled in dense mode is attached"):
        tocom.patch(model, mode="standard")
    with torch.no_grad():
        per_call = model.forward_features(IMAGES, r=4)  # delta(0 -> 4) on the fly, model stays at 0
        tocom.set_degree(model, 4)
        folded = model.forward_features(IMAGES)
    assert torch.allclose(per_call, folded, atol=1e-5) and per_call.shape == (2, 17, 32)

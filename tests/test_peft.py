"""Tests for tocom.peft: LoRA on fused qkv, AdaptFormer, fold, trainability, errors."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tocom.peft import (
    LoRAConfig,
    LoRAQKV,
    ParallelAdapterMLP,
    add_adaptformer,
    add_lora,
    base_linear,
    count_parameters,
    fold,
    mark_trainable,
    remove_adaptformer,
    remove_lora,
    trainable_parameters,
)

D = 64  # embed dim of the tiny test ViTs
TINY = dict(img_size=32, patch_size=8, embed_dim=D, depth=2, num_heads=4, num_classes=5)


def tiny_vit(kind: str = "vit", seed: int = 0) -> nn.Module:
    """A random-weight two-block ViT on 32x32 inputs (16 patches), in eval mode."""
    torch.manual_seed(seed)
    if kind == "deit":
        return VisionTransformerDistilled(**TINY).eval()
    if kind == "layerscale":
        return VisionTransformer(**TINY, init_values=0.5).eval()
    return VisionTransformer(**TINY, qkv_bias=True).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomise_lora(model: nn.Module, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAQKV):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)


@pytest.mark.parametrize("kind", ["vit", "deit", "layerscale"])
def test_lora_identity_at_init_then_merge_matches(kind: str, images: torch.Tensor) -> None:
    model = tiny_vit(kind)
    ref = model(images)
    add_lora(model, rank=4)
    assert sum(isinstance(m, LoRAQKV) for m in model.modules()) == 2
    assert torch.equal(model(images), ref)  # B = 0: bit-identical
    randomise_lora(model)
    unmerged = model(images)
    assert (unmerged - ref).abs().max() > 1e-3  # the LoRA now does something
    fold(model)
    assert not any(isinstance(m, LoRAQKV) for m in model.modules())
    assert all(type(blk.attn.qkv) is nn.Linear for blk in model.blocks)
    torch.testing.assert_close(model(images), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_qv_leaves_k_slice_unchanged() -> None:
    model = add_lora(tiny_vit(), rank=2, targets=("v", "q"))  # order must not matter
    qkv = model.blocks[0].attn.qkv
    assert qkv.targets == ("q", "v") and qkv.lora_A.shape == (2, 2, D) and qkv.lora_B.shape == (2, D, 2)
    randomise_lora(model)
    delta = qkv.delta_weight()
    assert delta.shape == (3 * D, D)
    assert torch.count_nonzero(delta[D:2 * D]) == 0
    # Rows [0:D) are q and [2D:3D) are v in timm's fused layout; target t owns A[t], B[t].
    torch.testing.assert_close(delta[:D], qkv.lora_B[0] @ qkv.lora_A[0])
    torch.testing.assert_close(delta[2 * D:], qkv.lora_B[1] @ qkv.lora_A[1])
    before = qkv.base.weight.detach().clone()
    fold(model)
    after = model.blocks[0].attn.qkv.weight
    assert torch.equal(after[D:2 * D], before[D:2 * D])
    torch.testing.assert_close(after - before, delta)


def test_lora_forward_matches_dense_delta_and_alpha_scales() -> None:
    base = nn.Linear(D, 3 * D)
    x = torch.randn(2, 5, D)
    layer = LoRAQKV(base, LoRAConfig(rank=3, targets=("k",), alpha=6.0))
    nn.init.normal_(layer.lora_B)
    assert layer.scaling == 2.0
    expected = nn.functional.linear(x, base.weight + layer.delta_weight(), base.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    manual = (layer.lora_B[0] @ layer.lora_A[0]) * 2.0
    torch.testing.assert_close(layer.delta_weight()[D:2 * D], manual)


def test_lora_follows_base_dtype_and_base_linear() -> None:
    model = tiny_vit().to(torch.bfloat16)
    add_lora(model, rank=2, targets=("q", "v"))
    qkv = model.blocks[1].attn.qkv
    assert qkv.lora_A.dtype == torch.bfloat16 and qkv.lora_B.dtype == torch.bfloat16
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # A compensator edits the base weight of a wrapped qkv; the edit must reach the output.
    assert base_linear(qkv) is qkv.base and base_linear(qkv.base) is qkv.base
    x = torch.randn(1, 4, D, dtype=torch.bfloat16)
    y0 = qkv(x)
    with torch.no_grad():
        base_linear(qkv).weight[:D] += 1.0
    assert not torch.equal(qkv(x)[..., :D], y0[..., :D])
    with pytest.raises(TypeError, match="nn.Linear or LoRAQKV"):
        base_linear(nn.Conv2d(1, 1, 1))


def test_remove_lora_restores_original_module(images: torch.Tensor) -> None:
    model = tiny_vit()
    original = model.blocks[0].attn.qkv
    ref = model(images)
    randomise_lora(add_lora(model))
    remove_lora(model)
    assert model.blocks[0].attn.qkv is original
    assert torch.equal(model(images), ref)


@pytest.mark.parametrize("kind", ["deit", "layerscale"])
def test_gradients_reach_only_lora_and_head(kind: str, images: torch.Tensor) -> None:
    model = add_lora(tiny_vit(kind), rank=2, targets=("q", "v"))
    mark_trainable(model, "lora", head=True)
    heads = model.get_classifier()
    head_params = {id(p) for h in (heads if isinstance(heads, tuple) else (heads,)) for p in h.parameters()}
    model.train()
    model(images).sum().backward()
    for name, p in model.named_parameters():
        allowed = "lora_" in name or id(p) in head_params
        assert p.requires_grad == allowed, name
        assert (p.grad is not None) == allowed, name
    assert model.blocks[0].attn.qkv.lora_B.grad.abs().sum() > 0
    trainable, total = count_parameters(model)
    expected = 2 * 2 * (2 * D + 2 * D) + sum(p.numel() for p in trainable_parameters(model)
                                            if id(p) in head_params)
    assert trainable == expected and total == sum(p.numel() for p in model.parameters())


def test_mark_trainable_extra_and_method_errors() -> None:
    model = add_adaptformer(tiny_vit())
    mark_trainable(model, "adaptformer", head=False, extra=["pos_embed", "blocks.1.norm1.*"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed" in names and "blocks.1.norm1.weight" in names and "head.weight" not in names
    assert all(n.startswith(("blocks.", "pos_embed")) for n in names)
    assert "blocks.0.mlp.adapter.up.weight" in names and "blocks.0.mlp.mlp.fc1.weight" not in names
    with pytest.raises(ValueError, match="call add_lora"):
        mark_trainable(model, "lora")
    with pytest.raises(ValueError, match="unknown PEFT method"):
        mark_trainable(model, "prefix")
    with pytest.raises(ValueError, match="matches no parameter"):
        mark_trainable(model, "adaptformer", extra=["nope.*"])


@pytest.mark.parametrize("kind", ["vit", "layerscale"])
def test_adaptformer_identity_effect_and_removal(kind: str, images: torch.Tensor) -> None:
    model = tiny_vit(kind)
    norm2, mlp = model.blocks[0].norm2, model.blocks[0].mlp
    ref = model(images)
    add_adaptformer(model, bottleneck=8, scale=0.1)
    blk = model.blocks[0]
    assert isinstance(blk.norm2, nn.Identity) and isinstance(blk.mlp, ParallelAdapterMLP)
    assert blk.mlp.adapter.down.out_features == 8
    torch.testing.assert_close(model(images), ref, atol=1e-6, rtol=0)  # W_up = 0: no effect
    with torch.no_grad():
        blk.mlp.adapter.up.weight.normal_()
    assert (model(images) - ref).abs().max() > 1e-3
    # The adapter reads the un-normalised block input: check one block against the formula.
    x = torch.randn(2, 17, D)
    h = x + blk.ls1(blk.attn(blk.norm1(x)))
    ad = blk.mlp.adapter
    expected = h + blk.ls2(mlp(norm2(h)) + 0.1 * ad.up(torch.relu(ad.down(h))))
    torch.testing.assert_close(blk(x), expected)
    fold(model)  # cannot fold AdaptFormer: it must stay
    assert isinstance(model.blocks[0].mlp, ParallelAdapterMLP)
    remove_adaptformer(model)
    assert model.blocks[0].norm2 is norm2 and model.blocks[0].mlp is mlp
    assert torch.equal(model(images), ref)


@pytest.mark.parametrize("method", ["lora", "adaptformer"])
def test_few_sgd_steps_reduce_loss(method: str) -> None:
    model = tiny_vit()
    with torch.no_grad():  # a larger frozen head so features, not a tiny head, limit the loss
        model.head.weight.normal_(0, 0.3)
    add_lora(model, rank=4) if method == "lora" else add_adaptformer(model, bottleneck=8)
    mark_trainable(model, method, head=False)  # only the adapter learns: proves it is wired in
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    model.train()
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_lora_dropout_only_in_training() -> None:
    layer = add_lora(tiny_vit(), rank=2, dropout=0.5).blocks[0].attn.qkv
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 4, D)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ("q", "o")}, "unknown LoRA target"),
        ({"targets": ()}, "empty"),
        ({"targets": ("q", "q")}, "duplicates"),
        ({"rank": 0}, "positive int"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_add_lora_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match=message):
        add_lora(model, **kwargs)
    assert not any(isinstance(m, LoRAQKV) for m in model.modules())  # nothing half-applied


def test_double_add_and_unsupported_models() -> None:
    model = add_adaptformer(add_lora(tiny_vit()))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(ValueError, match="already has AdaptFormer"):
        add_adaptformer(model)
    with pytest.raises(ValueError, match="bottleneck"):
        add_adaptformer(tiny_vit(), bottleneck=0)
    add_lora(fold(model))  # after merging, LoRA can be added again
    for bad in (nn.Sequential(nn.Linear(4, 4)), type("M", (nn.Module,), {})()):
        with pytest.raises(TypeError, match="VisionTransformer"):
            add_lora(bad)
    no_qkv = nn.Module()
    no_qkv.blocks = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(TypeError, match="attn.qkv"):
        add_adaptformer(no_qkv)

"""Layer 2: patching timm ViTs, on small random-weight models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from reference_tome import naive_vit_forward

import tocom
from tocom.compress import unmerge

VARIANTS = {
    "vit": dict(),
    "distilled": dict(name="deit_tiny_distilled_patch16_224"),
    "registers": dict(reg_tokens=3),
    "layer_scale_qk_norm": dict(init_values=0.1, qk_norm=True),
    "avg_pool": dict(class_token=False, global_pool="avg"),
}


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_r0_equals_stock_timm_and_unpatch_restores(variant):
    model = tiny_vit(**VARIANTS[variant])
    x = images()
    with torch.no_grad():
        stock = model(x)
        tocom.patch(model)
        assert torch.equal(model(x), stock)
        model.r = 4
        assert not torch.allclose(model(x), stock)
        tocom.unpatch(model)
        assert torch.equal(model(x), stock)
    assert not hasattr(model, "r")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["tome", "evit"])
def test_token_counts_per_layer(variant, method):
    model = tiny_vit(**VARIANTS[variant])
    if method == "evit" and model.cls_token is None:
        with pytest.raises(ValueError, match="class token"):
            tocom.patch(model, method)
        return
    tocom.patch(model, method)
    p = model.num_prefix_tokens
    model.r = [3, 2, 100, 1]
    with torch.no_grad():
        out = model.forward_features(images())
    n = 16 + p
    expected = []
    for r in [3, 2, 100, 1]:
        n -= min(r, (n - p) // 2)
        expected.append(n)
    assert model.last_state.tokens == expected
    assert out.shape[1] == expected[-1]
    assert model.effective_schedule() == model.last_state.schedule


@pytest.mark.parametrize("variant", ["vit", "distilled", "registers"])
def test_matches_naive_tome_reference(variant):
    model = tiny_vit(**VARIANTS[variant])
    x = images(3)
    schedule = [3, 2, 2, 1]
    with torch.no_grad():
        ref = naive_vit_forward(model, x, schedule)
        tocom.patch(model)
        model.r = schedule
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_sizes_sum_to_patch_count_and_prefix_first():
    model = tocom.patch(tiny_vit(**VARIANTS["distilled"]), trace_source=True)
    model.r = 3
    with torch.no_grad():
        model.forward_features(images())
    state = model.last_state
    assert torch.all(state.size[:, 2:].sum(1) == 16)
    assert torch.all(state.size[:, :2] == 1)
    # The first two rows of the source map are the class and distillation tokens themselves.
    assert torch.all(state.source[:, 0, 0] == 1) and torch.all(state.source[:, 1, 1] == 1)
    assert torch.all(state.source[:, :2].sum(-1) == 1)


def test_avg_pool_is_size_weighted():
    model = tocom.patch(tiny_vit(**VARIANTS["avg_pool"]), trace_source=True)
    model.r = 3
    with torch.no_grad():
        logits = model(images())
        tokens, state = model.forward_tokens(images())
        full = unmerge(tokens, state.source)  # every patch gets its group's token
        expected = model.head(model.fc_norm(full.mean(1)))
        with pytest.raises(ValueError, match="size"):  # unweighted pooling would be silently wrong
            model.forward_head(tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.forward_head(tokens, size=state.size), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    model = tocom.patch(tiny_vit(drop_path_rate=0.1), method)
    model.train()
    model.r = 2

    def grads(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        x = images().requires_grad_(True)
        torch.manual_seed(0)  # the same drop-path draws; checkpointing replays them on recompute
        model(x).sum().backward()
        return x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    x_plain, plain = grads(False)
    x_ckpt, ckpt = grads(True)
    assert x_plain.abs().sum() > 0
    torch.testing.assert_close(x_ckpt, x_plain, rtol=1e-5, atol=1e-6)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_repeated_calls_and_inference_mode_agree():
    model = tocom.patch(tiny_vit())
    model.r = 3
    x = images()
    with torch.no_grad():
        a = model(x)
        b = model(x)
    with torch.inference_mode():
        c = model(x)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert model.forward_head(model.forward_features(x)).shape == (2, 5)


def test_bad_input():
    model = tocom.patch(tiny_vit())
    with pytest.raises(ValueError, match=">= 0"):
        model.r = -1
    with pytest.raises(ValueError, match="method"):
        tocom.patch(tiny_vit(), "random")
    with pytest.raises(TypeError, match="supports"):
        tocom.patch(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="masks"):
        model(images(), attn_mask=torch.ones(1))


def test_patch_twice_is_noop():
    model = tiny_vit()
    tocom.patch(model)
    cls = type(model)
    model.r = 2
    tocom.patch(model)
    assert type(model) is cls and model.r == 2
    tocom.unpatch(model)
    assert type(model).__name__ == "VisionTransformer"


def class_attention(model, x):
    """Block 0's head-averaged attention of the class token, computed straight from timm's modules."""
    blk = model.blocks[0]
    tokens = model._pos_embed(model.patch_embed(x))
    h = blk.norm1(tokens)
    b, n, _ = h.shape
    heads, hd = blk.attn.num_heads, blk.attn.head_dim
    q, k, _ = blk.attn.qkv(h).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    logits = (q[:, :, :1] @ k.transpose(-1, -2))[:, :, 0] * hd ** -0.5  # (B, heads, N)
    return logits.softmax(-1).mean(1)


def test_evit_prunes_by_class_attention():
    model = tocom.patch(tiny_vit(), "evit", trace_source=True)
    model.r = [4, 0, 0, 0]
    x = images()
    with torch.no_grad():
        model(x)
        attn = torch.stack([class_attention(model, x[i:i + 1])[0] for i in range(2)])  # (B, 17)
    source = model.last_state.source
    assert torch.all(source.sum(-1) == 1)  # pruned tokens vanish from the map
    survivors = source.argmax(-1)  # original position of each surviving token, in order
    for i in range(2):
        top = attn[i, 1:].topk(16 - 4).indices + 1
        assert survivors[i].tolist() == [0] + sorted(top.tolist())


def test_evit_fuse_accounts_for_every_patch():
    model = tocom.patch(tiny_vit(), "evit", trace_source=True, fuse=True)
    model.r = [3, 2, 0, 0]
    with torch.no_grad():
        model(images())
    state = model.last_state
    assert state.tokens == [17 - 3, 17 - 5, 12, 12]
    # Every patch is in exactly one token, the fused tokens own the union of what they absorbed.
    torch.testing.assert_close(state.source.sum(-1, keepdim=True)[:, 1:], state.size[:, 1:])
    assert torch.all(state.source[:, 1:].sum(1)[:, 1:] == 1)
    assert torch.all(state.size[:, 1:].sum(1) == 16)
    assert torch.all(state.size.amax(1) > 3)  # the fused token of block 1 holds block 0's one

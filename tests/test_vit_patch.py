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
def test_gradients_reach_input_and_checkpointing(method):
    model = tocom.patch(tiny_vit(drop_path_rate=0.1), method)
    model.train()
    model.r = 2
    x = images().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    model.set_grad_checkpointing(True)
    x2 = images().requires_grad_(True)
    model(x2).sum().backward()
    assert x2.grad.abs().sum() > 0


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


def test_evit_prunes_by_class_attention():
    model = tocom.patch(tiny_vit(), "evit", trace_source=True)
    model.r = [4, 0, 0, 0]
    with torch.no_grad():
        model(images())
    kept = model.last_state.source.sum(-1)
    assert torch.all(kept == 1)  # pruned tokens vanish from the map
    assert model.last_state.tokens[0] == 17 - 4

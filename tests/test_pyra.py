"""PYRA token modulation: identity at init, a real effect once trained, fixed schedules, FLOPs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

import tocom
from tocom.compress import (
    ViTDims,
    bipartite_matching,
    merge_wavg,
    model_flops,
    modulate_sources,
    parse_schedule,
)
from tocom.pyra import (
    PYRA_SCHEDULES,
    PyraModulator,
    add_pyra,
    pyra_flops,
    pyra_parameters,
    pyra_schedule,
    remove_pyra,
)

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def pyra_model(r=(3, 2, 2, 1)):
    # Average pooling: with class-token pooling the last block's merge cannot reach the logits.
    model = tocom.patch(tiny_vit(global_pool="avg"))
    model.r = list(r)
    return model


def test_identity_at_init_and_effect_once_trained():
    model = pyra_model()
    before = model(IMAGES)
    add_pyra(model)
    assert torch.equal(model(IMAGES), before)  # W_D = 0: exactly the ToMe model
    assert pyra_schedule(model) == [3, 2, 2, 1]
    # A training step can move it: W_D gets a gradient at init (W_r's is zero until W_D moves).
    model(IMAGES).square().sum().backward()
    assert all(m.merge_modulator.w_d.grad.abs().sum() > 0 for m in model.blocks)
    with torch.no_grad():
        for blk in model.blocks:
            blk.merge_modulator.w_d.normal_(0, 1.0)
        assert (model(IMAGES) - before).abs().max() > 1e-3
    remove_pyra(model)
    assert torch.equal(model(IMAGES), before) and not pyra_parameters(model)


def test_modulation_matches_the_definition():
    torch.manual_seed(0)
    mod = PyraModulator(8, 3)
    with torch.no_grad():
        mod.w_d.normal_()
        mod.norm.weight.normal_()
    src, dst = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    m = torch.nn.functional.layer_norm(src + dst, (8,), mod.norm.weight, mod.norm.bias)
    d_channel = torch.einsum("brd,r->bd", m, mod.w_r)  # M W_r: one weight per channel
    d_pair = torch.einsum("brd,d->br", m, mod.w_d)  # W_D M: one weight per pair
    expected = src + (2 * d_pair.sigmoid() - 1)[..., None] * 2 * d_channel.sigmoid()[:, None] * src
    assert torch.allclose(mod(src, dst), expected, atol=1e-6)


def test_fused_merge_equals_modulate_then_merge():
    torch.manual_seed(0)
    x, metric, size = torch.randn(2, 17, 8), torch.randn(2, 17, 4), torch.rand(2, 17, 1) + 0.5
    plan = bipartite_matching(metric, 5, 1)
    mod = PyraModulator(8, 5)
    with torch.no_grad():
        mod.w_d.normal_()
    fused = merge_wavg(plan, x, size, mod)
    reference = merge_wavg(plan, modulate_sources(plan, x, mod), size)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused, reference))


def test_schedule_is_fixed_once_added():
    model = add_pyra(pyra_model())
    model.r = 2
    with pytest.raises(ValueError, match="block 0 was built for r=3 pairs but this merge has 2"):
        model(IMAGES)


def test_refuses_clamped_zero_and_unpatched_models():
    with pytest.raises(ValueError, match="clamped at block 1: it asks for r=8 but only 4"):
        add_pyra(pyra_model((8, 8)))  # 17 tokens: block 0 may merge 8, block 1 only (9 - 1) // 2
    with pytest.raises(ValueError, match="r=0 in every block"):
        add_pyra(pyra_model((0,)))
    with pytest.raises(ValueError, match="tocom.patch"):
        add_pyra(tiny_vit())
    evit = tocom.patch(tiny_vit(), "evit")
    evit.r = 2
    with pytest.raises(ValueError, match="patch\\(model, 'tome'\\)"):
        add_pyra(evit)
    with pytest.raises(ValueError, match="already has PYRA"):
        add_pyra(add_pyra(pyra_model()))


def test_named_schedules_resolve_for_depth_12_and_24():
    vit_b = ViTDims(depth=12, embed_dim=768, mlp_hidden=3072, num_patches=196, num_prefix=1)
    low, high = parse_schedule("low", vit_b), parse_schedule("high", vit_b)
    assert high == [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3] and low == [16] * 11 + [10]
    full = model_flops(vit_b, [0] * 12)
    assert abs(model_flops(vit_b, low) / full - 0.5) < 0.01
    assert abs(model_flops(vit_b, high) / full - 0.29) < 0.01
    assert len(PYRA_SCHEDULES["high"][24]) == 24
    with pytest.raises(ValueError, match="flops=0.29"):
        parse_schedule("high", ViTDims(depth=4, embed_dim=64, mlp_hidden=256, num_patches=16, num_prefix=1))


def test_pyra_flops_are_small_and_counted_per_pair():
    vit_b = ViTDims(depth=12, embed_dim=768, mlp_hidden=3072, num_patches=196, num_prefix=1)
    high = parse_schedule("high", vit_b)
    extra = pyra_flops(vit_b, high)
    assert extra == sum(10 * r * 768 + 768 + r for r in high)
    assert extra / model_flops(vit_b, high) < 1e-3
    assert pyra_flops(vit_b, [0] * 12) == 0

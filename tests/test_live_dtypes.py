"""The compensator in other dtypes and on other devices: fold, switch, per-call and training.

CPU covers bfloat16 and float64 here; tests/test_cuda.py repeats the device-bound parts on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_plugin, tiny_vit

import tocom
from tocom.compensator import Compensator, DistillObjective

D = 64



def images(dtype, n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(dtype)


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers (8 significant bits) at the magnitude of each float64 in x."""
    _, exponent = torch.frexp(x.abs().clamp_min(2.0 ** -100))
    return torch.ldexp(torch.ones_like(x), exponent - 8)


def test_switching_in_bfloat16_rounds_once():
    model = tiny_vit().to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    tocom.set_degree(model, 5)
    w = model.blocks[2].attn.qkv.weight.double()
    w0 = original["blocks.2.attn.qkv.weight"].double()
    assert plugin.A.dtype == torch.float32  # the plugin keeps its own precision
    delta = plugin.deltas(0, 5, dtype=torch.float64)[2]
    exact = torch.cat([w0[:D] + delta[0], w0[D:2 * D], w0[2 * D:] + delta[1]])
    # Rounding the float32 sum once to bfloat16 is off by at most half a bfloat16 step, plus the
    # float32 sum's own error; which way a near-tie falls depends on the CPU's kernels, so this is
    # a bound, not a bit pattern.
    summands = w0.abs() + torch.cat([delta[0], torch.zeros_like(w0[D:2 * D]), delta[1]]).abs()
    bound = 0.5 * _ulp_bf16(exact) + 2.0 ** -22 * summands
    assert ((w - exact).abs() <= bound).all()
    # The bound is tight enough to tell: rounding the delta to bfloat16 before the sum (twice) breaks it.
    twice = torch.cat([(w0[:D].bfloat16() + delta[0].bfloat16()).double(), w0[D:2 * D],
                       (w0[2 * D:].bfloat16() + delta[1].bfloat16()).double()])
    assert ((twice - exact).abs() > bound).any()
    for t in (3, 8, 1, 0):
        tocom.set_degree(model, t)
    tocom.detach(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k  # detach restores a copy: exact by construction


def test_switching_in_float64_agrees_with_an_independent_sum():
    model = tiny_vit().to(torch.float64)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    tocom.set_degree(model, 5)
    w = model.blocks[2].attn.qkv.weight
    w0 = original["blocks.2.attn.qkv.weight"]
    assert w.dtype == torch.float64
    # The reference: each group's B @ A summed one by one with its signed, scaled coefficient in
    # float64, a different order of operations from the fold's fused product.
    a, b = plugin.A.double(), plugin.B.double()
    coeff = plugin.coefficients(0, 5)
    for p, rows in ((0, slice(0, D)), (1, slice(2 * D, 3 * D))):
        delta = sum(coeff[k] * (b[2, p, k] @ a[2, p, k]) for k in range(a.shape[2]) if coeff[k] != 0)
        expected = w0[rows] + delta  # the coefficients carry the plugin's scale
        # Two float64 sums in different orders agree to a few units of 1e-16 relative, on any CPU.
        scale = w0[rows].abs() + delta.abs()
        assert ((w[rows] - expected).abs() <= 1e-14 * scale + 1e-300).all()
        assert not torch.equal(w[rows], w0[rows])  # the delta did land
    torch.testing.assert_close(w[D:2 * D], w0[D:2 * D], rtol=0, atol=0)  # k is never touched: a copy
    for t in (3, 8, 1, 0):
        tocom.set_degree(model, t)
    tocom.detach(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_per_call_degree_matches_folded_in_dtype(dtype):
    model = tiny_vit().to(dtype)
    tocom.attach(model, random_plugin(model), source=0)
    x = images(dtype)
    with torch.no_grad():
        live = model(x, r=6)
        tocom.set_degree(model, 6)
        folded = model(x)
    assert live.dtype == dtype
    tol = dict(rtol=0.05, atol=0.05) if dtype == torch.bfloat16 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(live, folded, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_distillation_step_in_dtype(dtype):
    model = tiny_vit().to(dtype)
    plugin = Compensator.init_for(model, groups=4, rank=2, scale=1.0)
    objective = DistillObjective(model, plugin, max_r=4)
    loss, info = objective((images(dtype, 4), torch.zeros(4, dtype=torch.long)))
    loss.backward()
    assert torch.isfinite(loss) and info["src"] != info["tgt"]
    assert plugin.B.grad is not None and plugin.B.grad.dtype == torch.float32
    assert plugin.B.grad.abs().sum() > 0  # B starts at zero, so only B gets a gradient at step 0


def test_model_moved_after_attach_still_switches():
    model = tiny_vit()
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    tocom.set_degree(model, 4)
    model.to(torch.float64)  # new storage: the attachment re-derives its pre-plugin rows
    tocom.set_degree(model, 0)
    original = tiny_vit().to(torch.float64).blocks[1].attn.qkv.weight
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, original, rtol=0, atol=1e-6)

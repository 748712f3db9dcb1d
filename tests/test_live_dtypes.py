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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_switching_in_dtype_is_exact_and_rounds_once(dtype):
    model = tiny_vit().to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    tocom.set_degree(model, 5)
    w = model.blocks[2].attn.qkv.weight
    w0 = original["blocks.2.attn.qkv.weight"]
    acc = torch.float32 if dtype == torch.bfloat16 else torch.float64
    delta = plugin.deltas(0, 5, dtype=torch.float64)[2].to(acc)
    assert w.dtype == dtype and plugin.A.dtype == torch.float32  # the plugin keeps its own precision
    # The sum is formed in the accumulation dtype and rounded once to the weights' dtype.
    torch.testing.assert_close(w[:D], (w0[:D].to(acc) + delta[0]).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(w[2 * D:], (w0[2 * D:].to(acc) + delta[1]).to(dtype), rtol=0, atol=0)
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

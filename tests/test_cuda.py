"""GPU checks (``python -m pytest -q -m cuda``); skipped where no CUDA device is present.

Distillation, folding, switching and per-call degrees on a GPU, in float32, float16 and bfloat16,
and a compiled model on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_plugin, tiny_vit

import tocom
from tocom.compensator import Compensator, DistillObjective

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
D = 64



def images(n=4, dtype=torch.float32):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)


@pytest.mark.parametrize("autocast", [False, True])
def test_distillation_step_on_gpu(autocast):
    model = tiny_vit().cuda()
    plugin = Compensator.init_for(model, groups=4, rank=2, scale=1.0).cuda()
    objective = DistillObjective(model, plugin, max_r=4)
    optimizer = torch.optim.AdamW(plugin.parameters(), lr=1e-3)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = objective((images(), torch.zeros(4, dtype=torch.long, device="cuda")))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and plugin.B.grad.is_cuda and plugin.B.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fold_switch_detach_on_gpu(dtype):
    model = tiny_vit().to("cuda", dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = random_plugin(model)  # a CPU plugin: attach moves it to the model's device
    tocom.attach(model, plugin, source=0)
    assert plugin.A.is_cuda
    tocom.set_degree(model, 5)
    w0 = original["blocks.1.attn.qkv.weight"]
    acc = torch.float32
    delta = plugin.deltas(0, 5, dtype=acc)[1]
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight[:D], (w0[:D].to(acc) + delta[0]).to(dtype))
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight[2 * D:],
                               (w0[2 * D:].to(acc) + delta[1]).to(dtype))
    x = images(dtype=dtype)
    with torch.inference_mode():
        folded = model(x)
        tocom.set_degree(model, 2)
        live = model(x, r=5)  # per call, on the fly
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(live, folded, **tol)
    tocom.detach(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_attach_on_cpu_then_move_to_gpu():
    model = tiny_vit()
    plugin = random_plugin(model)
    tocom.attach(model, plugin, source=0)
    tocom.set_degree(model, 4)
    cpu_out = model(images().cpu())
    model.cuda()
    tocom.set_degree(model, 4)
    torch.testing.assert_close(model(images()).cpu(), cpu_out, rtol=1e-4, atol=1e-4)
    tocom.set_degree(model, 0)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.cpu(), tiny_vit().blocks[0].attn.qkv.weight,
                               rtol=0, atol=1e-6)


def test_compiled_patched_model_matches_eager_on_gpu():
    model = tocom.patch(tiny_vit()).cuda()
    model.r = 3
    x = images()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)

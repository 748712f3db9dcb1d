"""tocom.compile: an elastic runner of static graphs per (degree, batch bucket), on tiny random ViTs.

The logic tests compile with ``backend="eager"`` (dynamo's tracing, guards and graph selection, no
C++ compilation); one inductor test is marked slow; the CUDA-graph tests run where a GPU is.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_plugin, tiny_vit

import tocom

TOL = dict(rtol=1e-5, atol=1e-5)  # float32: another batch size may change BLAS's summation order
DEGREES, BUCKETS = (0, 4), (2, 4)


def images(n, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compensated():
    """A 2-block tiny ViT with a plugin attached at source 0, and a runner for degrees 0 and 4."""
    model = tiny_vit(depth=2)
    tocom.attach(model, random_plugin(model, groups=4), source=0)
    runner = tocom.compile(model, degrees=DEGREES, batch_sizes=BUCKETS, backend="eager")
    return model, runner


@pytest.fixture
def at_source(compensated):
    model, runner = compensated
    tocom.set_degree(model, 0)
    yield model, runner
    tocom.set_degree(model, 0)


def test_every_graph_is_built_and_timed_at_construction(compensated):
    _, runner = compensated
    assert set(runner.capture_seconds) == {(d, b) for d in DEGREES for b in BUCKETS}
    assert all(s > 0 for s in runner.capture_seconds.values())
    assert not runner.graphs  # no CUDA graphs on the CPU
    assert [runner.bucket_for(n) for n in (1, 2, 3, 4, 5)] == [2, 2, 4, 4, 4]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
def test_padding_and_chunking_give_the_eager_rows(at_source, n):
    model, runner = at_source
    x = images(n)
    with torch.no_grad():
        out = runner(x)
        rows = torch.cat([model(x[i:i + 1]) for i in range(n)])  # one image at a time, eagerly
    assert out.shape == rows.shape
    torch.testing.assert_close(out, rows, **TOL)


def test_a_degree_switch_after_capture_selects_that_degrees_graph(at_source):
    model, runner = at_source
    x = images(3)
    with torch.no_grad():
        at0 = runner(x)
        model.r = 4  # no plugin fold: the degree alone
        at4 = runner(x)
        torch.testing.assert_close(at4, model(x), **TOL)
        assert not torch.allclose(at4, at0, rtol=1e-3, atol=1e-3)
        model.r = [4, 4]  # the same schedule spelled per block runs the same graph
        torch.testing.assert_close(runner(x), at4, rtol=0, atol=0)


def test_set_degree_with_a_plugin_folds_in_place_and_the_graphs_see_it(at_source):
    model, runner = at_source
    x = images(3)
    qkv = model.blocks[1].attn.qkv.weight
    before, address = qkv.detach().clone(), qkv.data_ptr()
    tocom.set_degree(model, 4)
    assert qkv.data_ptr() == address and not torch.equal(qkv, before)  # the same storage, new values
    with torch.no_grad():
        out = runner(x)
        # independent reference: the pre-plugin model (tiny_vit is seeded) with delta(0 -> 4) =
        # s * sum_{i<4} B_i A_i added to W_q and W_v by hand, run eagerly at 4
        plugin = model._tocom_compensator.plugin
        plain = tiny_vit(depth=2)
        for blk, a, b in zip(plain.blocks, plugin.A, plugin.B):
            dim = blk.attn.num_heads * blk.attn.head_dim
            dq, dv = (plugin.spec.scale * sum(b[p, i] @ a[p, i] for i in range(4)) for p in (0, 1))
            blk.attn.qkv.weight[:dim] += dq
            blk.attn.qkv.weight[2 * dim:] += dv
        tocom.patch(plain)
        plain.r = 4
        torch.testing.assert_close(out, plain(x), **TOL)
        torch.testing.assert_close(out, model(x), **TOL)
        fresh = tocom.compile(model, degrees=(4,), batch_sizes=(4,), backend="eager")
        assert torch.equal(fresh(x), out)  # the same graph on the same weights: bit for bit


def test_a_degree_not_compiled_is_refused_naming_the_compiled_ones(at_source):
    model, runner = at_source
    tocom.set_degree(model, 2)
    with pytest.raises(ValueError, match=r"degree 2, which this runner has not compiled \(compiled: 0, 4\)"):
        runner(images(2))


def test_calls_under_inference_mode_and_autocast_reuse_the_graphs(at_source):
    model, runner = at_source
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        x = images(4)
        out = runner(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = runner(images(4))
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    assert out.dtype == again.dtype == torch.float32
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_bad_inputs_and_options_are_refused_in_one_line(at_source):
    model, runner = at_source
    with pytest.raises(ValueError, match=r"compiled for images \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"):
        runner(images(2, size=64))
    with pytest.raises(ValueError, match="an empty batch"):
        runner(images(0))
    with pytest.raises(ValueError, match="batch_sizes must be positive ints"):
        tocom.compile(model, batch_sizes=(0, 8), warmup=False)
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        tocom.compile(model, graphs=True, warmup=False)
    with pytest.raises(ValueError, match="backend=None"):
        tocom.compile(model, backend=None, warmup=False)
    with pytest.raises(ValueError, match="call runner.warmup"):
        tocom.compile(model, degrees=(0,), backend="eager", warmup=False)(images(1))
    model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            tocom.compile(model, warmup=False)
    finally:
        model.eval()


def test_an_unpatched_model_compiles_at_degree_zero_only():
    model = tiny_vit(depth=2)
    x = images(3)
    runner = tocom.compile(model, degrees=(0,), batch_sizes=(4,), backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), **TOL)
    with pytest.raises(ValueError, match="an unpatched model runs at degree 0 only.*tocom.patch"):
        tocom.compile(model, degrees=(0, 8), warmup=False)


def test_bf16_autocast_of_a_patched_model_stays_close_to_float32():
    model = tiny_vit(img_size=64)  # 64 patches; r = 8 merges in every block
    tocom.patch(model)
    model.r = 8
    x = images(8, size=64)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        runner = tocom.compile(model, degrees=(8,), batch_sizes=(8,), backend="eager",
                               autocast=torch.bfloat16)
        compiled = runner(x)
    assert low.dtype == compiled.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (0.4% a rounding); through 4 blocks and their merges the logits
    # stay within 5% of their largest magnitude (measured: under 2.5%).
    assert (low.float() - full).abs().max() <= 0.05 * full.abs().max()
    torch.testing.assert_close(compiled.float(), low.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_an_inductor_graph_reads_weights_folded_after_it_was_compiled():
    """One real inductor graph (C++ on the CPU): 8 s with a warm inductor cache, 70 s cold on a busy
    2-core machine, so it is marked slow."""
    model = tiny_vit(depth=1)
    tocom.attach(model, random_plugin(model, groups=4), source=0)
    tocom.set_degree(model, 2)
    runner = tocom.compile(model, degrees=(2,), batch_sizes=(4,))
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=1e-4, atol=1e-5)
        before = runner(x)
        tocom.set_degree(model, 2, scale=0.5)  # the same degree, another delta: refolded in place
        after = runner(x)
        torch.testing.assert_close(after, model(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, before, rtol=1e-4, atol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", [None, "inductor"])
def test_cuda_graphs_pad_chunk_and_follow_an_in_place_switch(backend):
    model = tiny_vit(depth=2).cuda()
    tocom.attach(model, random_plugin(model, groups=4), source=0)
    runner = tocom.compile(model, degrees=(0, 4), batch_sizes=(2, 4), backend=backend)
    assert runner.graphs and len(runner.capture_seconds) == 4
    x = images(9).cuda()
    with torch.no_grad():
        for n in (1, 3, 4, 9):
            torch.testing.assert_close(runner(x[:n]), model(x[:n]), rtol=1e-4, atol=1e-4)
        tocom.set_degree(model, 4)
        torch.testing.assert_close(runner(x), model(x), rtol=1e-4, atol=1e-4)
    model.half()
    with pytest.raises(ValueError, match="weights moved"):
        runner(x)

"""Deployment formats of a patched model: torch.compile(fullgraph=True) and ONNX (dynamo exporter).

A degree is a Python-level constant of the graph (it sets the sequence lengths), so one compiled
graph or one ONNX file serves one degree: see docs/export.md.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

import tocom
from tocom.compensator import Compensator


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def elastic_model():
    model = tiny_vit()
    plugin = Compensator.init_for(model, groups=8)
    with torch.no_grad():
        plugin.B.normal_(0, 0.05)
    tocom.attach(model, plugin, source=0)
    tocom.set_degree(model, 4)
    return model


def test_compile_fullgraph_matches_eager():
    # aot_eager captures the whole graph exactly as inductor would (fullgraph fails on any break)
    # without two minutes of C++ compilation on a small CPU; tests/test_cuda.py runs inductor.
    model = elastic_model()
    x = images()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_model_recompiles_at_most_once_per_degree():
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = elastic_model()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    x = images()
    outputs = {}
    with torch.no_grad():
        for degree in (4, 0, 6, 4, 0, 6, 4):
            tocom.set_degree(model, degree)  # folds weights in place: same tensors, no new graph
            out = compiled(x)
            if degree in outputs:
                assert torch.equal(out, outputs[degree])
            outputs[degree] = out
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) <= 3, f"{len(graphs)} graphs for 3 degrees"


def test_onnx_export_with_dynamic_batch_matches_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = elastic_model()
    path = tmp_path / "deit_r4.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        torch.onnx.export(model, (images(2),), str(path), dynamo=True, input_names=["images"],
                          output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = images(n, seed=n)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert got.shape == (n, 5)
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)

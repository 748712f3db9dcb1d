"""``tocom serve --compile``: the model worker serves through a tocom.compile runner.

Tiny random ViTs and the runner's ``backend="eager"`` (dynamo's tracing and graph selection, no
code generation) keep these fast; one inductor test is marked slow.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import random_plugin, tiny_vit
from test_serve_service import png

import tocom
from tocom.models.loading import save_model
from tocom.runtime import CompiledRunner
from tocom.serve.service import ModelWorker, ServeConfig, Service

NAME = "vit_tiny_patch16_224"
KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=5)
DEGREES = (0, 2, 4)
# float32 probabilities: a padded bucket and another graph may change BLAS's summation order
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A tiny checkpoint and a random plugin for it, and a fresh latency cache."""
    monkeypatch.setenv("TOCOM_CACHE", str(tmp_path / "cache"))
    model = tiny_vit()
    save_model(model, tmp_path / "tiny.safetensors", NAME, KWARGS)
    plugin = random_plugin(model, groups=4)
    plugin.save(tmp_path / "tiny.tocom.safetensors")
    return str(tmp_path / "tiny.safetensors"), str(tmp_path / "tiny.tocom.safetensors")


@pytest.fixture
def runner_calls(monkeypatch):
    """(degree, batch size) -> how many times a CompiledRunner was called there."""
    calls: dict[tuple[int, int], int] = {}
    original = CompiledRunner.__call__

    def counting(self, images):
        key = (self.model.r, images.shape[0])
        calls[key] = calls.get(key, 0) + 1
        return original(self, images)

    monkeypatch.setattr(CompiledRunner, "__call__", counting)
    return calls


def configs(checkpoint: str, plugin: str | None) -> tuple[ServeConfig, ServeConfig]:
    eager = ServeConfig(model=NAME, checkpoint=checkpoint, plugin=plugin, source=0, degrees=DEGREES,
                        slo_ms=1000, max_batch=4, threads=1)
    return eager, replace(eager, compile=True, compile_backend="eager")


def test_compiled_worker_answers_as_the_eager_one_at_every_degree(files, runner_calls):
    checkpoint, plugin = files
    eager_config, compiled_config = configs(checkpoint, plugin)
    eager, compiled = ModelWorker(eager_config), ModelWorker(compiled_config)
    assert eager.elastic.runner is None and isinstance(compiled.elastic.runner, CompiledRunner)
    front = Service(compiled_config, compiled.describe())
    images = torch.stack([front.preprocess(png(i)) for i in range(3)])
    for degree in (0, 4, 2, 0):  # switches back and forth after start-up
        want, *_, ran_eager = eager.run(images.numpy(), degree)
        before = runner_calls.get((degree, 3), 0)
        got, compute_ms, switch_ms, ran = compiled.run(images.numpy(), degree)
        assert runner_calls[degree, 3] == before + 1  # the batch ran through the graphs
        assert ran == ran_eager == degree and compute_ms > 0
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), **TOL)
    info = front.info()
    assert info["config"]["compile"] and info["compiled"]["backend"] == "eager"
    assert info["compiled"]["batch_sizes"] == [1, 2, 4] and not info["compiled"]["cuda_graphs"]
    # a graph per (degree, bucket) unless two degrees share a schedule
    assert set(info["compiled"]["capture_seconds"]) <= {f"{d}/{b}" for d in DEGREES for b in (1, 2, 4)}
    assert info["compiled"]["total_seconds"] > 0
    assert Service(eager_config).info()["compiled"] is None


def test_a_switch_after_start_up_runs_the_freshly_folded_plugin(files):
    """The compiled graphs read W_q, W_v as folded by each switch: compare with an independent
    model that has the plugin attached at the same degree and runs eagerly."""
    checkpoint, plugin = files
    _, compiled_config = configs(checkpoint, plugin)
    worker = ModelWorker(compiled_config)
    reference = tiny_vit()  # the same seeded weights the checkpoint holds
    tocom.attach(reference, tocom.Compensator.load(plugin), source=0)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for degree in (4, 2, 4):
        got, *_ = worker.run(x, degree)
        tocom.set_degree(reference, degree)
        with torch.no_grad():
            want = reference(x).softmax(dim=-1)
        torch.testing.assert_close(torch.from_numpy(got), want, **TOL)
    # the plugin's delta matters at degree 4, so a graph reading unfolded weights would have failed
    plain = tocom.patch(tiny_vit(), "tome")
    plain.r = 4
    with torch.no_grad():
        assert not torch.allclose(plain(x).softmax(dim=-1), torch.from_numpy(got), atol=1e-4)


def test_calibration_times_the_runner_at_every_degree_and_bucket(files, runner_calls):
    checkpoint, _ = files
    calls = runner_calls
    _, config = configs(checkpoint, None)
    config = replace(config, max_batch=8, compile_batch_sizes=(3, 8))
    worker = ModelWorker(config)
    degrees = worker.elastic.degrees
    table = worker.describe()["table"]
    sizes = {1, 2, 3, 4, 8}  # the batcher's sizes up to 8, and every bucket
    assert set(map(int, table)) == set(degrees)
    assert all(set(map(int, row)) == sizes for row in table.values())
    assert all(calls.get((d, b), 0) >= 2 for d in degrees for b in sizes)  # warm-up and rounds
    assert worker.describe()["calibration"]["cached"] is False
    # an eager worker's table is cached apart: it measures again instead of taking the compiled one
    eager = ModelWorker(replace(config, compile=False, compile_batch_sizes=None))
    assert eager.describe()["calibration"]["cached"] is False
    assert ModelWorker(config).describe()["calibration"]["cached"] is True


def test_bad_compile_flags_are_refused_in_one_line():
    from tocom.cli import build_parser
    from tocom.serve.cli import config_from_args

    parse = lambda *a: config_from_args(build_parser().parse_args(["serve", "m", *a]))
    assert not parse().compile
    on = parse("--compile", "--max-batch", "8", "--compile-batch-sizes", "8,1")
    assert on.compile and on.compile_backend == "inductor" and on.compile_batch_sizes == (1, 8)
    assert parse("--compile", "--compile-backend", "none", "--device", "cuda").compile_backend is None
    refusals = [
        (("--compile-backend", "eager"), "only apply with --compile"),
        (("--compile-batch-sizes", "1,2"), "only apply with --compile"),
        (("--compile", "--compile-backend", "none"), "need --device cuda"),
        (("--compile", "--compile-batch-sizes", "1,32"), r"must lie in 1..--max-batch \(16\)"),
        (("--compile", "--compile-batch-sizes", "0,4"), "must lie in 1"),
    ]
    for flags, message in refusals:
        with pytest.raises(ValueError, match=message) as err:
            parse(*flags)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="timm models only.*without --compile"):
        config_from_args(build_parser().parse_args(["serve", "hf:some/vit", "--compile"]))
    with pytest.raises(SystemExit):  # argparse's own one line
        build_parser().parse_args(["serve", "m", "--compile", "--compile-backend", "tvm"])


def test_a_model_the_runner_refuses_is_refused_naming_why():
    from tocom.serve.elastic import ElasticModel

    elastic = ElasticModel(tiny_vit(), DEGREES)
    elastic.model.train()  # the runner builds inference graphs only
    with pytest.raises(ValueError, match="--compile cannot compile this model: .*model.eval"):
        elastic.compile((1, 2), "eager")
    assert elastic.runner is None


def test_a_hugging_face_model_is_refused_by_the_runner_in_one_line():
    transformers = pytest.importorskip("transformers")
    from tocom.serve.elastic import ElasticModel

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    elastic = ElasticModel(transformers.ViTForImageClassification(config).eval(), (0, 2))
    with pytest.raises(ValueError, match="--compile cannot compile this model: .*timm's call API") as err:
        elastic.compile((1, 2), "eager")
    assert "\n" not in str(err.value) and elastic.runner is None


@pytest.mark.slow
def test_inductor_worker_matches_the_eager_one(files):
    checkpoint, _ = files
    eager_config, compiled_config = configs(checkpoint, None)
    small = dict(degrees=(0, 4), max_batch=2)
    eager = ModelWorker(replace(eager_config, **small))
    # one bucket: two graphs to generate code for (~100 s cold on a 2-core CPU with four)
    compiled = ModelWorker(replace(compiled_config, compile_backend="inductor", compile_batch_sizes=(2,),
                                   **small))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for degree, n in ((0, 2), (4, 1)):  # one image runs padded to the bucket of 2
        want, *_ = eager.run(x[:n], degree)
        got, *_ = compiled.run(x[:n], degree)
        # inductor fuses and reorders float32 reductions
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-4, atol=1e-5)

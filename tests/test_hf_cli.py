"""``hf:PATH`` models in every command: loading checks, preprocessing from the folder's image
processor, eval / bench / visualize / serve against plain ``transformers``, and one-line refusals."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from tocom.cli import main  # noqa: E402
from tocom.data import load_dataset, transform_from_record  # noqa: E402
from tocom.data.transforms import hf_record  # noqa: E402
from tocom.models.hf_load import hf_preprocessing, load_hf  # noqa: E402
from tocom.models.loading import save_model  # noqa: E402

CLASSES = ["circle", "square", "triangle", "cross", "ring", "bar"]


def tiny_folder(root, processor=None, seed: int = 0):
    """A random 2-layer ViT classifier (32 px, 8 px patches) saved as transformers saves it."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8,
                                    id2label=dict(enumerate(CLASSES)), initializer_range=0.2)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(root)
    (processor or transformers.DeiTImageProcessor(size={"height": 40, "width": 40},
                                                  crop_size={"height": 32, "width": 32},
                                                  resample=3)).save_pretrained(root)
    return root


@pytest.fixture
def folder(tmp_path):
    return tiny_folder(tmp_path / "tiny-vit")


def run(capsys, *args) -> str:
    main([str(a) for a in args])
    return capsys.readouterr().out


def refusal(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def transformers_predictions(folder, images) -> list[int]:
    """Top-1 of plain transformers, preprocessed by the folder's own (slow, PIL) image processor."""
    model = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, use_fast=False)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return model(pixel_values=pixels).logits.argmax(-1).tolist()


def test_eval_top1_equals_transformers_top1(folder, vtab_task, capsys):
    out = run(capsys, "eval", f"hf:{folder}", "--data", vtab_task, "--target", "0", "2", "--json")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    test = load_dataset(vtab_task, "test")
    images, labels = zip(*(test[i] for i in range(len(test))))
    predicted = transformers_predictions(folder, list(images))
    assert len(set(predicted)) > 1  # a model that answers one class would make the check vacuous
    expected = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
    assert [r["target"] for r in rows] == [0, 2]
    assert rows[0]["accuracy"] == pytest.approx(expected, abs=1e-9)


def photo(seed: int, size=(53, 41)) -> Image.Image:
    """A smooth random RGB picture (resampling differences show on edges, as in photographs)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


PROCESSORS = {  # one of each size convention: squash + crop, squash, shortest edge + crop
    "DeiTImageProcessor": dict(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                               resample=3),
    "ViTImageProcessor": dict(size={"height": 32, "width": 32}, resample=2),
    "BitImageProcessor": dict(size={"shortest_edge": 37}, crop_size={"height": 32, "width": 32}, resample=3,
                              image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]),
}


def assert_same_pixels(ours: torch.Tensor, theirs: torch.Tensor, std, backend: str) -> None:
    """Pillow backend: the same resize and crop, so only float rounding differs (1e-5). Torchvision
    backend (transformers' default): its antialiased uint8 resize may round a value one 8-bit level
    apart from Pillow's, so values agree to one level, and fewer than a third of them differ at all."""
    assert ours.shape == theirs.shape
    if backend == "Pil":
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
        return
    level = torch.tensor(std).view(3, 1, 1).reciprocal() / 255
    assert ((ours - theirs).abs() <= level + 1e-5).all()
    assert ((ours - theirs).abs() > 1e-5).float().mean() < 1 / 3


@pytest.mark.parametrize("backend", ["Pil", ""])
@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_record_gives_the_image_processors_pixels(kind, backend, tmp_path):
    processor = getattr(transformers, kind + backend)(**PROCESSORS[kind])
    processor.save_pretrained(tmp_path)
    record = hf_record(json.loads((tmp_path / "preprocessor_config.json").read_text()))
    transform = transform_from_record(record)
    for seed, size in [(0, (53, 41)), (1, (41, 53)), (2, (64, 64)), (3, (45, 80))]:
        image = photo(seed, size)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert theirs.shape == (3, 32, 32)
        assert_same_pixels(transform(image), theirs, record["std"], backend)


@pytest.mark.parametrize("backend", ["Pil", ""])
def test_record_matches_on_real_images(backend, shared, tmp_path):
    # facebook/deit-*'s processor: squash to 256, centre crop 224, bicubic, ImageNet mean and std
    processor = getattr(transformers, "DeiTImageProcessor" + backend)()
    processor.save_pretrained(tmp_path)
    record = hf_record(json.loads((tmp_path / "preprocessor_config.json").read_text()))
    files = sorted((shared / "data" / "imagenet-sample").glob("*.JPEG"))[:4]
    assert files
    for file in files:
        image = Image.open(file).convert("RGB")
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert_same_pixels(transform_from_record(record)(image), theirs, record["std"], backend)


def test_bench_and_visualize(folder, tmp_path, capsys):
    out = run(capsys, "bench", f"hf:{folder}", "--r", "0", "2", "--rounds", "1", "--batch-size", "2",
              "--json")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["r"] for r in rows] == ["-", "0", "2"]
    assert [r["tokens"] for r in rows] == [17, 17, 17 - 2 * 2]  # 16 patches + class token, 2 layers
    image = tmp_path / "x.png"
    photo(0, (48, 48)).save(image)
    out_png = tmp_path / "merge.png"
    run(capsys, "visualize", image, "--model", f"hf:{folder}", "--r", "3", "--out", out_png)
    assert Image.open(out_png).size == (64, 32)  # the 32 px input and its merge map side by side


def transformers_probs(folder, image: Image.Image) -> torch.Tensor:
    model = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, use_fast=False)
    with torch.no_grad():
        return model(**processor(images=image, return_tensors="pt")).logits.softmax(-1)[0]


def test_serve_model_answers_as_transformers(folder):
    from tocom.serve.service import ServeConfig, load_elastic

    elastic, _ = load_elastic(ServeConfig(model=f"hf:{folder}", degrees=(0, 2)))
    image = photo(5, (50, 44))
    transform = transform_from_record(hf_preprocessing(f"hf:{folder}"))
    probs = elastic.run(transform(image)[None], 0)[0]
    assert torch.allclose(probs, transformers_probs(folder, image), atol=1e-5)
    assert elastic.gflops[2] < elastic.gflops[0]


def test_serve_service_answers_as_transformers(folder, tmp_path, monkeypatch):
    from tocom.serve.service import ServeConfig, Service

    monkeypatch.setenv("TOCOM_CACHE", str(tmp_path / "cache"))
    service = Service(ServeConfig(model=f"hf:{folder}", degrees=(0, 2), fixed_degree=0, slo_ms=1000,
                                  max_batch=2, threads=1))
    assert service.classes == CLASSES  # from config.id2label
    image = photo(5, (50, 44))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    answer = service.classify([service.preprocess(buf.getvalue())], [0.0], [3])[0]
    top = transformers_probs(folder, image).topk(3)
    assert [p["index"] for p in answer["predictions"]] == top.indices.tolist()
    assert [p["label"] for p in answer["predictions"]] == [CLASSES[i] for i in top.indices.tolist()]
    assert [p["probability"] for p in answer["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_folder_metadata_is_checked_before_loading(folder, tmp_path, capsys, vtab_task):
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    (bin_folder / "pytorch_model.bin").write_bytes(b"not read")
    err = refusal(capsys, "eval", f"hf:{bin_folder}", "--data", vtab_task)
    assert "unpickling" in err and "safe_serialization=True" in err
    (bin_folder / "config.json").write_text("{not json")
    assert "not valid JSON" in refusal(capsys, "bench", f"hf:{bin_folder}")
    config = json.loads((folder / "config.json").read_text())
    (bin_folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert "architecture BertModel is not supported" in refusal(capsys, "bench", f"hf:{bin_folder}")
    assert "no config.json" in refusal(capsys, "bench", f"hf:{tmp_path}")
    (folder / "preprocessor_config.json").unlink()
    assert "no preprocessor_config.json" in refusal(capsys, "eval", f"hf:{folder}", "--data", vtab_task)


def test_hub_id_offline_is_one_clear_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    err = refusal(capsys, "bench", "hf:facebook/deit-tiny-patch16-224")
    assert "hf:facebook/deit-tiny-patch16-224 is not a local folder and the hub is unreachable" in err
    assert "hf download facebook/deit-tiny-patch16-224 --local-dir" in err
    assert "no folder" in refusal(capsys, "bench", "hf:./missing/folder")


def test_refusals_name_what_and_why(folder, vtab_task, tmp_path, capsys):
    err = refusal(capsys, "eval", f"hf:{folder}", "--pretrained", "--data", vtab_task)
    assert "--pretrained downloads timm weights" in err
    err = refusal(capsys, "finetune", f"hf:{folder}", "--data", vtab_task, "--method", "pyra")
    assert "not supported for hf: models" in err
    err = refusal(capsys, "finetune", f"hf:{folder}", "--data", vtab_task, "--method", "adaptformer",
                  "--out-format", "hf")
    assert "do not fold" in err
    err = refusal(capsys, "finetune", f"hf:{folder}", "--data", vtab_task, "--task", "segmentation")
    assert "segmentation fine-tuning is not supported for hf: models" in err
    backbone = tmp_path / "backbone"
    config = transformers.ViTConfig(**json.loads((folder / "config.json").read_text()))
    transformers.ViTModel(config).save_pretrained(backbone)
    (backbone / "preprocessor_config.json").write_text((folder / "preprocessor_config.json").read_text())
    capsys.readouterr()  # transformers' own progress bar while saving
    err = refusal(capsys, "eval", f"hf:{backbone}", "--data", vtab_task)
    assert "ViTModel, which has no classifier head" in err
    other = tmp_path / "other.safetensors"
    save_model(torch.nn.Linear(2, 2), other, f"hf:{folder}", metadata={"hf_architecture": "DeiTModel"})
    err = refusal(capsys, "eval", f"hf:{folder}", "--checkpoint", other, "--data", vtab_task)
    assert "was saved for DeiTModel" in err
    from tocom.models.hf_vit import HFViTAdapter

    if "per_call" not in HFViTAdapter.features:  # an adapter without a per-call degree cannot distil
        images = tmp_path / "images"
        images.mkdir()
        photo(0).save(images / "a.png")
        err = refusal(capsys, "distill", f"hf:{folder}", "--data", images, "--steps", "1")
        assert "compensator distillation" in err and "hf-vit" in err


def test_distill_eval_and_adapt_a_plugin(folder, vtab_task, tmp_path, capsys):
    from tocom.compensator import Compensator
    from tocom.models.hf_vit import HFViTAdapter

    if "per_call" not in HFViTAdapter.features:
        pytest.skip("the hf-vit adapter has no per-call degree here (refusal tested above)")
    images, plugin = vtab_task / "images", tmp_path / "plugin.safetensors"
    run(capsys, "distill", f"hf:{folder}", "--data", images, "--steps", "2", "--max-r", "4",
        "--batch-size", "4", "--workers", "0", "--out", plugin)
    assert Compensator.load(plugin).spec.family == "hf-vit"
    out = run(capsys, "eval", f"hf:{folder}", "--plugin", plugin, "--data", vtab_task, "--target", "0", "2",
              "--json")
    rows = {(r["target"], r["plugin"]): r["accuracy"] for r in map(json.loads, out.splitlines())}
    assert rows[0, True] == rows[0, False]  # at the source degree the plugin's delta is zero
    tuned = tmp_path / "tuned.safetensors"
    run(capsys, "finetune", f"hf:{folder}", "--data", vtab_task, "--method", "lora", "--r", "0",
        "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", tuned)
    adapted = tmp_path / "adapted.safetensors"
    out = run(capsys, "adapt", f"hf:{folder}", "--checkpoint", tuned, "--plugin", plugin, "--data", images,
              "--steps", "2", "--batch-size", "4", "--eval-every", "1", "--out", adapted)
    assert f"wrote {adapted}" in out and Compensator.load(adapted).spec.adapted["checkpoint"] == tuned.name


def test_core_never_imports_transformers():
    code = ("import sys, tocom, tocom.cli, tocom.models.hf_load, tocom.peft.hf, tocom.serve.service; "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_transformers_the_fix_is_named(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ValueError, match=r'pip install "tocom\[hf\]"'):
        load_hf(f"hf:{folder}")


@pytest.mark.slow
def test_real_deit_tiny_folder_evaluates_as_transformers(shared, tmp_path, capsys):
    from tocom.models.hf_convert import from_timm
    from tocom.models.loading import create_model

    folder = tmp_path / "deit-tiny"
    timm_model = create_model("deit_tiny_patch16_224", shared / "weights/deit_tiny_patch16_224.safetensors")
    from_timm(timm_model).save_pretrained(folder)
    transformers.DeiTImageProcessor().save_pretrained(folder)  # transformers' defaults: squash 256, crop 224
    sample = shared / "data/imagenet-sample"
    lines = [line.split() for line in (sample / "labels.txt").read_text().splitlines() if line.strip()][:32]
    task = tmp_path / "task"
    task.mkdir()
    (task / "images").symlink_to(sample)
    (task / "test.txt").write_text("".join(f"images/{name} {label}\n" for name, label in lines))
    out = run(capsys, "eval", f"hf:{folder}", "--data", task, "--target", "0", "8", "--json")
    rows = {r["target"]: r["accuracy"] for r in map(json.loads, out.splitlines())}
    images = [Image.open(sample / name).convert("RGB") for name, _ in lines]
    model = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    processor = transformers.DeiTImageProcessorPil.from_pretrained(folder)
    with torch.no_grad():
        predicted = model(**processor(images=images, return_tensors="pt")).logits.argmax(-1).tolist()
    expected = sum(p == int(y) for p, (_, y) in zip(predicted, lines)) / len(lines)
    assert expected > 0.5  # real weights: DeiT-Tiny is 72% top-1 on ImageNet
    assert rows[0] == pytest.approx(expected, abs=1e-9)
    assert rows[8] > 0.4  # r = 8 costs a few points, not the model

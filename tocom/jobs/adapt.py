"""``tocom adapt``: a universal plugin adapted, without labels, to one fine-tuned model.

The objective is :class:`tocom.compensator.adapt.AdaptObjective` (teacher: the model at its own
source degree; student: the model at another degree with the plugin's delta). This job decodes the
images once, in the preprocessing the checkpoint records, caches the teacher's logits, holds out
every ``holdout_every``-th image, and keeps the plugin that scores the lowest held-out KL among the
evaluations that are no worse than the universal plugin at any evaluated degree, up to a stated
tolerance (else the universal plugin itself): adaptation never ships a plugin that held-out images
say is worse.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from tocom.atomic import atomic_write
from tocom.compensator import Compensator, check_fits, is_attached
from tocom.compensator.adapt import AdaptObjective, teacher_logits
from tocom.data import transform_from_record
from tocom.data._io import IMG_EXTENSIONS, find_images, load_rgb
from tocom.finetuned import checkpoint_metadata, eval_transform_for, load_model, source_degree
from tocom.models import require_feature, weights_fingerprint
from tocom.models.hf_load import hf_preprocessing, is_hf
from tocom.report.provenance import sha256_file
from tocom.train import distributed
from tocom.train.config import TrainConfig
from tocom.train.trainer import logged_evals, train

EVAL_TARGETS = (0, 4, 8, 12, 16)


@dataclass(frozen=True)
class AdaptConfig:
    """How an adaptation runs; every field but the last four is recorded in the plugin."""

    steps: int = 120
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW would pull the factors toward no plugin, not the universal one
    holdout_every: int = 10  # every 10th image (sorted by path) is held out for the stopping rule
    eval_every: int = 50
    eval_targets: tuple[int, ...] = EVAL_TARGETS  # clipped to the plugin's degrees, minus the source
    # A candidate may exceed the universal plugin's held-out KL at a degree by at most this fraction:
    # at small degrees both KLs are tiny and a few held-out images move them by several percent.
    tolerance: float = 0.1
    seed: int = 0
    checkpoint_every: int = 25
    device: str | None = None
    progress: bool = True
    teacher_batch: int = 64

    def recorded(self) -> dict:
        out = asdict(self)
        for key in ("checkpoint_every", "device", "progress", "teacher_batch"):
            del out[key]
        return out


def adapt(model: nn.Module, plugin: Compensator, images: torch.Tensor, *, source: int,
          steps: int | None = None, config: AdaptConfig | None = None, run_dir: str | Path | None = None,
          resume: bool = False, record: dict | None = None) -> Compensator:
    """``plugin`` adapted to ``model`` on unlabelled ``images``; neither argument is changed.

    Args:
        model: the fine-tuned classifier (patched or not), run at ``source`` by its user.
        plugin: the universal plugin to start from (its shape must fit ``model``).
        images: ``(N, 3, H, W)`` float images, preprocessed as the model expects, N >= 2.
        source: the degree ``model`` was fine-tuned at.
        steps: overrides ``config.steps``.
        run_dir: checkpoints, the log and the best plugin so far; a temporary folder when None.
        resume: continue a killed run from ``run_dir``.
        record: extra fields for the plugin's ``adapted`` metadata (checkpoint name, image hash).

    Returns:
        A new :class:`Compensator` whose ``spec.adapted`` records the model's weights fingerprint,
        the source degree, the recipe and the held-out KL of no plugin, the universal plugin and
        the adapted one at each evaluated degree.
    """
    config = config or AdaptConfig()
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    if not (torch.is_tensor(images) and images.ndim == 4 and images.shape[1] == 3 and len(images) >= 2):
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a (N >= 2, 3, H, W) tensor, got {got}")
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or infinite values; check their preprocessing")
    if is_attached(model):
        raise ValueError("the model has a plugin attached; tocom.detach(model) first, so that the teacher "
                         "is the model as it was fine-tuned")
    check_fits(plugin.spec, model)
    plugin.check_degree(source)
    if run_dir is None:
        run_dir = tempfile.mkdtemp(prefix="tocom-adapt-")
    run_dir = Path(run_dir)
    start = time.time()
    device = torch.device(config.device) if config.device else distributed.default_device()
    fingerprint = weights_fingerprint(model)
    work = copy.deepcopy(plugin).float()
    objective = AdaptObjective(model, work, source)
    targets = [t for t in config.eval_targets if t != source and t <= work.spec.max_degree]
    model.to(device).eval()
    work.to(device)

    held_idx = torch.arange(0, len(images), config.holdout_every)
    mask = torch.ones(len(images), dtype=torch.bool)
    mask[held_idx] = False
    teacher = teacher_logits(model, images, source, config.teacher_batch, device)
    held_x, held_t = images[held_idx], teacher[held_idx]
    train_x, train_t = images[mask], teacher[mask]

    step0 = run_dir / "step0.json"
    if resume and step0.is_file():
        baseline = json.loads(step0.read_text())
    else:  # compression alone, and the universal plugin: the two things adaptation must beat
        baseline = {name: {str(t): v for t, v in objective.held_out_kl(
                        held_x, held_t, targets, config.teacher_batch, plugin=with_plugin).items()}
                    for name, with_plugin in (("none", False), ("universal", True))}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(step0, lambda tmp: Path(tmp).write_text(json.dumps(baseline)))
    universal = baseline["universal"]
    best_file, best_json = run_dir / "best.tocom.safetensors", run_dir / "best.json"

    def evaluate(obj: nn.Module, step: int) -> dict[str, float]:
        scores = obj.held_out_kl(held_x, held_t, targets, config.teacher_batch)
        mean = sum(scores.values()) / len(scores)
        safe = all(scores[t] <= universal[str(t)] * (1 + config.tolerance) for t in targets)
        best = json.loads(best_json.read_text()) if best_json.is_file() else None
        if safe and (best is None or mean < best["kl_mean"]):
            obj.plugin.save(best_file)
            point = {"step": step, "kl_mean": mean, "scores": {str(t): v for t, v in scores.items()}}
            atomic_write(best_json, lambda tmp: Path(tmp).write_text(json.dumps(point)))
        return {"kl_mean": mean, **{f"kl_{t}": v for t, v in scores.items()}}

    if not resume:
        best_json.unlink(missing_ok=True)
        best_file.unlink(missing_ok=True)
    train_config = TrainConfig(
        steps=config.steps, lr=config.lr, batch_size=min(config.batch_size, len(train_x)),
        weight_decay=config.weight_decay, checkpoint_every=config.checkpoint_every,
        eval_every=config.eval_every, seed=config.seed, progress=config.progress,
        log_every=min(10, config.steps))
    result = train(objective, TensorDataset(train_x, train_t), train_config, out_dir=run_dir, resume=resume,
                   device=device, evaluate=evaluate)
    curve = logged_evals(run_dir) if resume else result.evals
    picked = json.loads(best_json.read_text()) if best_json.is_file() else None
    universal_mean = sum(universal.values()) / len(universal)
    if picked is not None and picked["kl_mean"] < universal_mean:
        adapted, chosen = Compensator.load(best_file), picked["scores"]
    else:  # nothing on the held-out images beat the universal plugin at every degree: keep it
        adapted, picked, chosen = copy.deepcopy(plugin).float().cpu(), {"step": 0}, dict(universal)
    info = {
        **(record or {}), "weights_sha256": fingerprint, "source": source, "images": len(images),
        "held_out": len(held_x), "steps": config.steps, "picked_step": picked["step"],
        "recipe": {**config.recorded(), "teacher": "model at source", "pairs": "source -> t",
                   "loss": "kl logits"},
        "held_out_kl": {"none": baseline["none"], "universal": universal, "adapted": chosen},
        "curve": curve, "wall_s": round(time.time() - start, 1),
    }
    adapted.spec = dataclasses.replace(adapted.spec, adapted=info)
    return adapted.cpu()


def image_list_sha256(root: Path, files: list[Path]) -> str:
    """SHA-256 over each image's path relative to ``root`` and its bytes, in sorted order."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def decode_folder(root: Path, transform, progress: bool = True) -> tuple[torch.Tensor, list[Path]]:
    """Every image under ``root`` (recursively; labels files are never read) through ``transform``:
    ``(N, 3, H, W)`` and the sorted file list."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = find_images(root)
    if not files:
        raise FileNotFoundError(f"no images under {root} (searched recursively for "
                                f"{', '.join(IMG_EXTENSIONS)}); point --data at the task's images")
    out = []
    for f in tqdm(files, desc="decode", disable=not progress):
        try:
            out.append(transform(load_rgb(f)))
        except RuntimeError as err:  # load_rgb names the file; the CLI prints ValueErrors as one line
            raise ValueError(str(err)) from None
    return torch.stack(out), files


def run_adapt(model_name: str, checkpoint: str | Path, plugin_file: str | Path, data: str | Path,
              out: str | Path, config: AdaptConfig | None = None, source: int | None = None,
              run_dir: str | Path | None = None, resume: bool = False) -> tuple[Compensator, dict]:
    """Adapt ``plugin_file`` to the fine-tuned ``checkpoint`` on the images under ``data``; write ``out``.

    Returns the adapted plugin and its ``adapted`` record.
    """
    config = config or AdaptConfig()
    checkpoint, data = Path(checkpoint), Path(data)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    meta = checkpoint_metadata(checkpoint)
    if "method" not in meta:
        raise ValueError(f"{checkpoint} is not a fine-tuned checkpoint (its metadata records no tocom "
                         "finetune method); adapt a plugin to the model you fine-tuned (tocom finetune)")
    if meta["method"] == "pyra":
        raise ValueError(f"{checkpoint} is a PYRA model, which runs only at the schedule it was trained at; "
                         "a plugin cannot move it to another degree")
    if source is None:
        source = source_degree(meta)
        if source is None:
            raise ValueError(f"{checkpoint} records no constant source degree; pass --source")
    plugin = Compensator.load(plugin_file)
    compression = meta.get("compression", "tome")
    if plugin.spec.method != compression:
        raise ValueError(f"{plugin_file} compensates {plugin.spec.method} but {checkpoint} was fine-tuned "
                         f"with {compression}; use a {compression} plugin "
                         f"(tocom distill --method {compression})")
    if is_hf(model_name):
        from tocom.peft.hf import load_finetuned_hf

        model = load_finetuned_hf(model_name, str(checkpoint))
        require_feature(model, "per_call", "plugin adaptation (a per-call q/v delta)")
        transform = transform_from_record(hf_preprocessing(model_name, meta))
    else:
        model = load_model(model_name, checkpoint).eval()
        transform = eval_transform_for(checkpoint, model)
    check_fits(plugin.spec, model)  # before any image is decoded
    plugin.check_degree(source)
    images, files = decode_folder(data, transform, config.progress)
    record = {"checkpoint": checkpoint.name, "checkpoint_sha256": sha256_file(checkpoint),
              "base_plugin": Path(plugin_file).name, "base_plugin_sha256": sha256_file(plugin_file),
              "images_sha256": image_list_sha256(data, files)}
    run_dir = Path(run_dir) if run_dir else Path(str(out) + ".run")
    adapted = adapt(model, plugin, images, source=source, config=config, run_dir=run_dir, resume=resume,
                    record=record)
    adapted.save(out)
    return adapted, adapted.spec.adapted

"""``tocom finetune``: fine-tune a timm ViT on a labelled dataset under a compression schedule.

Methods: ``full`` (every weight), ``lora`` (rank-h LoRA on q, k, v or q, v of the fused qkv),
``adaptformer`` (bottleneck adapters parallel to each MLP) and ``pyra`` (LoRA plus PYRA token
modulation, its modulators optionally at their own ``modulator_lr``). The loop is
:func:`tocom.train.trainer.train` with a :class:`ClassifyObjective`; the result is one safetensors
file with LoRA folded in (AdaptFormer adapters and PYRA modulators stay: they run at inference)
that :func:`tocom.finetuned.load_model` rebuilds.

Presets (``PRESETS``): ToCom's downstream recipes (DeiT-style: AdamW, cosine, label smoothing 0.1,
RandAugment + random erasing, lr scaled per 512 images of global batch; their mixup/cutmix,
repeated augmentation and EMA are not reproduced), PYRA's VTAB-1k recipe, and ``small`` for quick
runs on a few hundred images.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from tocom.compress import check_unclamped, parse_schedule, resolve_schedule
from tocom.data import load_dataset, preprocessing_record, train_transform, transform_from_record
from tocom.finetuned import FINETUNE_METHODS, finetune_metadata
from tocom.jobs.evaluate import make_loader
from tocom.models import dims_of, patch, unpatch
from tocom.models.hf_load import folder_preprocessing, is_hf, save_hf
from tocom.models.loading import (
    build_model,
    checkpoint_num_classes,
    create_model,
    read_state_dict,
    save_model,
)
from tocom.models.metadata import model_kwargs as checked_model_kwargs
from tocom.peft import add_adaptformer, add_lora, fold, mark_trainable
from tocom.peft.hf import merge_hf_lora
from tocom.pyra import PARAM_PATTERN, add_pyra, pyra_parameters
from tocom.train import distributed
from tocom.train.checkpoint import load_checkpoint
from tocom.train.config import TrainConfig, build_optimizer, lr_per_512
from tocom.train.trainer import Objective, logged_evals, train

HEAD_KEYS = ("head.", "head_dist.")  # DeiT distilled models have a second head
OUT_FORMATS = ("tocom", "hf")  # tocom's safetensors, or a transformers save_pretrained folder
RECIPE_FIELDS = ("steps", "lr", "batch_size", "weight_decay", "warmup_steps", "seed")  # of TrainConfig


@dataclass(frozen=True)
class FinetunePreset:
    """A published (or quick) recipe; command-line flags override its fields."""

    method: str | None  # the method the recipe was published for (None: any, pass --method)
    epochs: int
    batch_size: int  # per process
    lr: float  # absolute, or per 512 images of global batch when lr_per_512
    weight_decay: float
    warmup_epochs: int
    augment: str  # tocom.data.train_transform kind; "squash" also validates on squashed images
    label_smoothing: float = 0.0
    drop_path: float = 0.0
    lr_per_512: bool = False
    full_lr: float | None = None  # presets for any method: lr of full fine-tuning
    schedule: str = "0"  # default --r


PRESETS: dict[str, FinetunePreset] = {
    # ToCom (Jie et al., ECCV 2024) README: CIFAR-100, 100 epochs, lr 5e-5 per 512, warm-up 10.
    "tocom-cifar100-full": FinetunePreset("full", 100, 128, 5e-5, 0.05, 10, "deit", 0.1, 0.1, True),
    # ToCom FGVC (CUB's lr; Cars/Flowers 2e-3, Dogs 2e-4), 30 epochs, warm-up 5.
    "tocom-fgvc-full": FinetunePreset("full", 30, 64, 1e-3, 0.05, 5, "deit", 0.1, 0.1, True),
    # VTAB-1k AdaptFormer, 100 epochs, NOAH-style (ToCom publishes no VTAB command line).
    "tocom-vtab-adaptformer": FinetunePreset("adaptformer", 100, 64, 1e-3, 1e-4, 10, "squash"),
    # PYRA (Xiong et al., ECCV 2024) scripts: LoRA + PYRA, batch 32, no augmentation, direct resize.
    "pyra-vtab": FinetunePreset("pyra", 100, 32, 1e-3, 1e-4, 10, "squash", schedule="high"),
    "small": FinetunePreset(None, 10, 32, 1e-3, 1e-4, 1, "squash", full_lr=1e-4),
}


class ClassifyObjective(Objective):
    """``objective((images, labels)) -> (cross-entropy, {"acc": batch accuracy})``; trains in train mode.

    ``modulator_lr_scale``: None trains PYRA's modulators like every other parameter; a number puts
    their W_r and W_D in their own optimizer group whose lr is that multiple of the scheduled lr
    (so warm-up and cosine apply to them too).
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0,
                 modulator_lr_scale: float | None = None) -> None:
        super().__init__()
        if modulator_lr_scale is not None:
            if not (math.isfinite(modulator_lr_scale) and modulator_lr_scale > 0):
                raise ValueError(f"modulator_lr_scale must be a finite number > 0, got {modulator_lr_scale}")
            if not pyra_parameters(model):
                raise ValueError("modulator_lr_scale is set but the model has no PYRA modulators "
                                 "(tocom.pyra.add_pyra)")
        self.model = model
        self.label_smoothing = label_smoothing
        self.modulator_lr_scale = modulator_lr_scale

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Param groups for :func:`tocom.train.config.build_optimizer`.

        Its default split (weight decay on trainables of >= 2 dims, none on 1-D ones), in the same
        order, plus, when ``modulator_lr_scale`` is set, a third group of PYRA's W_r and W_D with
        that ``lr_scale`` and no weight decay (both are 1-D).
        """
        trainable = [p for p in self.parameters() if p.requires_grad]
        own = set() if self.modulator_lr_scale is None else {id(p) for p in pyra_parameters(self.model)}
        rest = [p for p in trainable if id(p) not in own]
        # The first group has no weight_decay key: build_optimizer fills in config.weight_decay.
        groups: list[dict[str, Any]] = [{"params": [p for p in rest if p.ndim >= 2]},
                                        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}]
        if own:
            groups.append({"params": [p for p in trainable if id(p) in own], "weight_decay": 0.0,
                           "lr_scale": self.modulator_lr_scale})
        return groups

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = batch[0], batch[1]
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return loss, {"acc": (logits.argmax(-1) == labels).float().mean()}


def load_for_classes(name: str, checkpoint: str | Path | None, pretrained: bool, num_classes: int,
                     **kwargs: Any) -> tuple[nn.Module, bool, dict[str, Any]]:
    """The backbone with a ``num_classes`` head: ``(model, head_is_new, architecture kwargs)``.

    The pretrained head is kept when its size matches and dropped (freshly initialised) otherwise.
    """
    if checkpoint is None:
        model = create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        # timm keeps its pretrained head only when the class counts agree.
        return model, not pretrained or model.pretrained_cfg.get("num_classes") != num_classes, {}
    state, meta = read_state_dict(checkpoint)
    if meta.get("method") in ("adaptformer", "pyra"):
        raise ValueError(f"{checkpoint} holds a {meta['method']} model; fine-tune from plain weights "
                         "(full and lora outputs are plain)")
    keep = checkpoint_num_classes(state) == num_classes
    if not keep:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
    model = build_model(name, state, meta, checkpoint, num_classes=num_classes,
                        optional=() if keep else HEAD_KEYS, **kwargs)
    return model, not keep, checked_model_kwargs(meta, checkpoint)


def add_method(model: nn.Module, method: str, rank: int = 8, targets: tuple[str, ...] = ("q", "k", "v"),
               bottleneck: int = 32, scale: float = 0.1) -> dict[str, Any]:
    """Add ``method``'s modules to a patched model at its schedule, choose what trains; returns the
    adapter settings to record."""
    if method == "full":
        model.requires_grad_(True)
        return {}
    if method == "adaptformer":
        mark_trainable(add_adaptformer(model, bottleneck=bottleneck, scale=scale), "adaptformer")
        return {"bottleneck": bottleneck, "scale": scale}
    if method not in ("lora", "pyra"):
        raise ValueError(f"unknown method {method!r}; choose one of {FINETUNE_METHODS}")
    add_lora(model, rank=rank, targets=targets)
    if method == "pyra":
        add_pyra(model)
    mark_trainable(model, "lora", extra=[PARAM_PATTERN] if method == "pyra" else ())
    return {"rank": rank, "targets": list(targets)}


@dataclass
class FinetuneConfig:
    """What :func:`run_finetune` trains: the model, the data, the method, the schedule, the recipe, the run.

    ``None`` for ``method``, ``r``, ``epochs``, ``batch_size``, ``lr`` or ``val_every`` takes the
    preset's value. The command line's ``tocom finetune`` flags map one to one onto these fields.
    """

    model_name: str
    data: str | Path  # a VTAB-1k folder or ImageFolder splits
    checkpoint: str | Path | None = None
    pretrained: bool = False
    # what trains, under which compression
    method: str | None = None  # "full", "lora", "adaptformer" or "pyra"
    compression: str = "tome"  # or "evit" (not with PYRA)
    r: str | None = None  # any parse_schedule text: "8", "8,8,4", "flops=0.5", "low", "high"
    rank: int = 8
    lora_targets: tuple[str, ...] = ("q", "k", "v")
    bottleneck: int = 32
    adapter_scale: float = 0.1
    # the recipe
    preset: str = "small"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    modulator_lr: float | None = None  # PYRA's W_r and W_D, absolute; None: they train at lr
    split_train: str = "train"  # or "trainval": train on both, no validation
    val_every: int | None = None  # epochs
    seed: int = 0
    # the run
    out: str | Path = "finetuned.safetensors"
    out_format: str = "tocom"  # or "hf": a transformers save_pretrained folder (hf: models, full / lora)
    run_dir: str | Path | None = None  # None: OUT.run
    resume: bool = False
    num_workers: int = 2
    device: str | None = None
    progress: bool = True


def prepare_model(config: FinetuneConfig, num_classes: int, *, drop_path: float = 0.0,
                  classes: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model :func:`run_finetune` trains: a ``num_classes`` head, ``config.compression`` (ToMe
    merging or EViT pruning) at schedule ``config.r`` (text), ``config.method``'s modules, and only
    what the method trains marked trainable. ``method`` and ``r`` must be set (not None).

    Like every ToMe model, a block asked for more than it can merge is clamped (DeiT at r = 16 merges
    only 10 in its last block); PYRA alone refuses such schedules, since its weights are per pair.

    An ``hf:`` model is prepared by :func:`prepare_hf_model` (``classes`` name its labels).

    Returns:
        the model and ``{"schedule", "peft", "new_head", "model_kwargs"}`` for the checkpoint metadata.
    """
    c = config
    if is_hf(c.model_name):
        return prepare_hf_model(c, classes or [str(i) for i in range(num_classes)])
    extra = {"drop_path_rate": drop_path} if drop_path else {}
    model, new_head, model_kwargs = load_for_classes(c.model_name, c.checkpoint, c.pretrained, num_classes,
                                                     **extra)
    if c.method == "pyra" and c.compression != "tome":
        raise ValueError("PYRA modulates token merging; fine-tune it with compression='tome'")
    patch(model, c.compression)
    dims = dims_of(model)
    schedule = resolve_schedule(parse_schedule(c.r, dims), dims.depth)
    if c.method == "pyra":
        check_unclamped(schedule, dims.num_tokens, dims.num_prefix)
    model.r = schedule
    peft = add_method(model, c.method, c.rank, tuple(c.lora_targets), c.bottleneck, c.adapter_scale)
    return model, {"schedule": schedule, "peft": peft, "new_head": new_head, "model_kwargs": model_kwargs}


def check_hf_config(c: FinetuneConfig, method: str) -> None:
    """Refuse what fine-tuning an ``hf:`` model does not support, before any data is read."""
    from tocom.peft.hf import HF_METHODS

    if method not in HF_METHODS:
        raise ValueError(f"method {method!r} is not supported for hf: models (PYRA's modulators hook timm "
                         f"blocks only); choose one of {HF_METHODS}, or fine-tune the timm port of the model")
    if c.checkpoint is not None or c.pretrained:
        raise ValueError(f"{c.model_name} holds its own weights: drop --checkpoint / --pretrained (to "
                         "continue from a tocom finetune output, write it with --out-format hf and fine-tune "
                         "that folder)")


def prepare_hf_model(c: FinetuneConfig, classes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`prepare_model` for ``hf:PATH``: its classifier re-sized to ``classes`` (re-initialised when
    the size differs), patched at the schedule, with peft LoRA or tocom's AdaptFormer; the model
    returned is the ``peft.PeftModel`` for LoRA."""
    from tocom.models.hf_load import load_hf
    from tocom.peft.hf import adaptformer_parameters, add_hf_adaptformer, add_hf_lora, train_only

    model = load_hf(c.model_name, num_labels=len(classes), id2label=classes)
    new_head = head_was_resized(c.model_name, len(classes))
    patch(model, c.compression)
    dims = dims_of(model)
    schedule = resolve_schedule(parse_schedule(c.r, dims), dims.depth)
    model.r = schedule
    if c.method == "full":
        model.requires_grad_(True)
        peft: dict[str, Any] = {}
    elif c.method == "adaptformer":
        train_only(add_hf_adaptformer(model, c.bottleneck, c.adapter_scale), adaptformer_parameters(model))
        peft = {"bottleneck": c.bottleneck, "scale": c.adapter_scale}
    else:
        model = add_hf_lora(model, c.rank, tuple(c.lora_targets))
        peft = {"rank": c.rank, "targets": list(c.lora_targets), "library": "peft"}
    return model, {"schedule": schedule, "peft": peft, "new_head": new_head, "model_kwargs": {}}


def head_was_resized(name: str, num_classes: int) -> bool:
    """Whether an ``hf:`` folder's head has another size than ``num_classes`` (so it starts afresh)."""
    from tocom.models.hf_load import resolve_folder

    config = json.loads((resolve_folder(name) / "config.json").read_text())
    labels = config.get("id2label") or {}
    return (len(labels) if labels else int(config.get("num_labels", 2))) != num_classes


def accuracy_hook(data: Dataset, batch_size: int, num_workers: int):
    """An ``evaluate(objective, step)`` for :func:`train`: top-1 on this rank's shard of ``data``."""
    shard = Subset(data, range(distributed.rank(), len(data), distributed.world_size()))
    loader = make_loader(shard, batch_size, num_workers)

    def evaluate(objective: nn.Module, step: int) -> dict[str, float]:
        device = next(objective.parameters()).device
        correct = seen = 0
        for images, labels in loader:
            logits = objective.model(images.to(device))
            correct += int((logits.argmax(-1).cpu() == labels).sum())
            seen += len(labels)
        return {"val_acc": correct / max(seen, 1)}

    return evaluate


def check_resumed_lr_scales(objective: nn.Module, config: TrainConfig, ckpt_path: Path) -> None:
    """Raise if the run at ``ckpt_path`` was trained with other param groups or ``lr_scale``s.

    The optimizer's state dict carries each group's ``lr_scale`` and loading it would silently keep
    the old ones, so a resume with another ``modulator_lr`` must be refused here.
    """
    if not ckpt_path.is_file():
        return  # train() says what to do about a missing checkpoint
    saved = [g.get("lr_scale", 1.0) for g in load_checkpoint(ckpt_path)["optimizer"]["param_groups"]]
    asked = [g["lr_scale"] for g in build_optimizer(objective, config).param_groups]
    if len(saved) != len(asked) or not all(math.isclose(a, b) for a, b in zip(saved, asked)):
        raise ValueError(f"cannot resume: {ckpt_path} was trained with param-group lr scales {saved}, "
                         f"this call gives {asked}; pass the original modulator_lr (--modulator-lr) "
                         "or use a new run dir")


def run_finetune(config: FinetuneConfig, *, stop_after: int | None = None
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune and write ``config.out``; returns the (folded) model and the recipe recorded in it.

    ``r`` is any :func:`tocom.compress.parse_schedule` text (``8``, ``8,8,4``, ``flops=0.5``,
    ``low``/``high``); with PYRA a schedule that would be clamped is refused. ``split_train="trainval"``
    trains on train+val (VTAB-1k's final-number protocol) and then skips validation.

    ``modulator_lr`` (``method="pyra"`` only): the peak lr of PYRA's W_r and W_D, absolute (not scaled
    per 512 images). They get their own optimizer group at ``lr_scale = modulator_lr / lr``, so they
    follow the same warm-up and cosine schedule. None (default) trains them at ``lr``. Recorded in
    the recipe as given.
    """
    c = config
    if c.preset not in PRESETS:
        raise ValueError(f"unknown preset {c.preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[c.preset]
    method = c.method or p.method
    if method not in FINETUNE_METHODS:
        choose = f"one of {FINETUNE_METHODS}"
        raise ValueError(f"preset {c.preset!r} serves any method: pass method= {choose}"
                         if method is None else f"unknown method {method!r}; choose {choose}")
    if c.modulator_lr is not None:
        if method != "pyra":
            raise ValueError(f"modulator_lr sets the lr of PYRA's modulators; it needs method='pyra', "
                             f"got method={method!r}")
        if not (math.isfinite(c.modulator_lr) and c.modulator_lr > 0):
            raise ValueError(f"modulator_lr must be a finite number > 0, got {c.modulator_lr}")
    if c.split_train not in ("train", "trainval"):
        raise ValueError(f"split_train must be 'train' or 'trainval', got {c.split_train!r}")
    batch_size = c.batch_size or p.batch_size
    world = distributed.world_size()
    lr = c.lr
    if lr is None:
        lr = p.full_lr if method == "full" and p.full_lr else p.lr
        lr = lr_per_512(lr, batch_size * world) if p.lr_per_512 else lr

    hf = is_hf(c.model_name)
    if hf:
        check_hf_config(c, method)
    if c.out_format not in OUT_FORMATS:
        raise ValueError(f"unknown out_format {c.out_format!r}; choose one of {OUT_FORMATS}")
    if c.out_format == "hf" and not (hf and method in ("full", "lora")):
        raise ValueError("--out-format hf writes a transformers folder: it needs an hf: model fine-tuned "
                         "with full or lora (AdaptFormer adapters do not fold into plain weights)")

    torch.manual_seed(c.seed)  # new head, LoRA A and PYRA W_r: identical in a resumed process
    train_data = load_dataset(c.data, c.split_train)  # its class count sizes the head; transform below
    text = c.r if c.r is not None else p.schedule
    model, info = prepare_model(replace(c, method=method, r=text), train_data.num_classes,
                                drop_path=p.drop_path, classes=[str(n) for n in train_data.classes])

    squash = p.augment in ("none", "squash")
    if hf:  # the folder's image processor gives size and mean/std; squash recipes squash at that size
        preprocessing = folder_preprocessing(c.model_name)
        if squash:
            preprocessing = {**preprocessing, "resize": "squash", "resize_size": None, "crop_pct": 1.0,
                             "interpolation": "bicubic"}
        train_data.transform = train_transform(p.augment, img_size=preprocessing["size"],
                                               mean=tuple(preprocessing["mean"]),
                                               std=tuple(preprocessing["std"]))
    else:
        train_data.transform = train_transform(p.augment, model_or_cfg=model)  # the model's size and mean/std
        # Recorded in the checkpoint, so every later evaluation sees what validation saw.
        preprocessing = preprocessing_record("squash" if squash else "crop", model)
    val_data = (load_dataset(c.data, "val", transform_from_record(preprocessing))
                if c.split_train == "train" else None)
    per_epoch = len(train_data) // (batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"{len(train_data)} training images cannot fill one batch of {batch_size} x {world} "
                         "processes; lower --batch-size")
    epochs = c.epochs or p.epochs
    steps = epochs * per_epoch
    val_every = c.val_every or max(1, epochs // 10)
    train_config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, weight_decay=p.weight_decay,
                               warmup_steps=min(steps, p.warmup_epochs * per_epoch),
                               num_workers=c.num_workers, checkpoint_every=per_epoch,
                               eval_every=val_every * per_epoch if val_data else 0, seed=c.seed,
                               progress=c.progress)
    hook = accuracy_hook(val_data, batch_size, c.num_workers) if val_data is not None else None
    modulator_scale = None if c.modulator_lr is None else c.modulator_lr / lr
    objective = ClassifyObjective(model, p.label_smoothing, modulator_scale)
    run_dir = Path(c.run_dir) if c.run_dir else Path(str(c.out) + ".run")
    if c.resume:
        check_resumed_lr_scales(objective, train_config, run_dir / "last.ckpt")
    start = time.time()
    result = train(objective, train_data, train_config, out_dir=run_dir, resume=c.resume, evaluate=hook,
                   device=c.device, stop_after=stop_after)
    # after a resume, the log also holds the validations made before the interruption
    evals = logged_evals(run_dir) if c.resume else result.evals
    recipe = {
        "preset": c.preset, "method": method, "data": str(c.data), "split_train": c.split_train,
        "images": len(train_data), "classes": train_data.num_classes, "new_head": info["new_head"],
        "schedule_text": text, "epochs": epochs, **{k: getattr(train_config, k) for k in RECIPE_FIELDS},
        "modulator_lr": c.modulator_lr,  # None: the modulators trained at lr
        "augment": p.augment, "label_smoothing": p.label_smoothing, "drop_path": p.drop_path,
        "world_size": world, "wall_s": round(time.time() - start, 1), "steps_done": result.step,
        "val_acc": evals[-1]["val_acc"] if evals else None,
        "curve": [[e["step"], e["val_acc"]] for e in evals],
    }
    # folds LoRA (lora, pyra; peft's merge_and_unload for hf:); adapters and modulators stay
    model = (merge_hf_lora(model) if hf else fold(model)).cpu().eval()
    if distributed.rank() == 0 and result.step == steps:
        meta = finetune_metadata(method, info["schedule"], info["peft"], recipe, preprocessing, c.compression)
        if c.out_format == "hf":
            save_hf(unpatch(copy.deepcopy(model)), c.out, preprocessing)
        else:
            if hf:
                meta.update(hf_architecture=getattr(type(model), "_tocom_base", type(model)).__name__,
                            classes=json.dumps([str(n) for n in train_data.classes]))
            save_model(model, c.out, c.model_name, info["model_kwargs"], meta)
    return model, recipe

"""The ``tocom`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from tocom.compress import parse_schedule
from tocom.models import COMPRESSION_METHODS, dims_of, patch, unpatch
from tocom.models.hf_load import is_hf
from tocom.report.cli import add_parser as add_report_parser
from tocom.serve.cli import add_parser as add_serve_parser

MODEL_HELP = ("timm model name, e.g. deit_tiny_patch16_224, or hf:PATH: a transformers save_pretrained "
              "folder or hub id (the hub only without HF_HUB_OFFLINE)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--checkpoint", help="local weights: .safetensors or .pth (loaded with weights_only); for "
                                        "hf:PATH a tocom finetune output of that model")
    p.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")


def _add_run_args(p: argparse.ArgumentParser, out: str) -> None:
    """Flags every training command shares (both run on the one engine)."""
    p.add_argument("--out", default=out)
    p.add_argument("--run-dir", help="checkpoints and metrics (default: OUT.run)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)


def _load(args: argparse.Namespace):
    from tocom.finetuned import load_model

    if is_hf(args.model):
        from tocom.peft.hf import load_finetuned_hf

        refuse_pretrained(args)
        return load_finetuned_hf(args.model, args.checkpoint)
    # Each command patches and sets r itself (bench also times an unpatched copy), so a fine-tuned
    # model comes back unpatched; its PYRA modulators stay in its blocks for the next patch().
    return unpatch(load_model(args.model, args.checkpoint, pretrained=args.pretrained)).eval()


def refuse_pretrained(args: argparse.Namespace) -> None:
    """--pretrained is timm's download; an hf: model brings its own weights."""
    if getattr(args, "pretrained", False):
        raise ValueError(f"--pretrained downloads timm weights; {args.model} already holds its weights, "
                         "drop --pretrained")


def cmd_bench(args: argparse.Namespace) -> None:
    from tocom.report.bench import bench
    from tocom.report.tables import format_table, json_lines

    model = _load(args)
    dims = dims_of(model)
    schedules = [parse_schedule(r, dims) for r in args.r]
    # timm models know their input size; an hf: model's is its config's image_size (the patch grid)
    img_size = dims.square_image_size if is_hf(args.model) else None
    rows = bench(model, schedules, args.method, args.batch_size, args.device, rounds=args.rounds,
                 img_size=img_size, progress=not args.json)
    print(json_lines(r.as_dict() for r in rows) if args.json else format_table([r.as_dict() for r in rows]))


def cmd_delta(args: argparse.Namespace) -> None:
    from tocom.models.loading import write_delta

    counts = write_delta(args.checkpoint, args.base, args.out)
    print(f"wrote {args.out}: {counts['kept']} of {counts['total']} tensors differ from {args.base}, "
          f"{counts['bytes'] / 2**20:.2f} MB; it loads with {Path(args.base).name} at its path or beside it")


def cmd_visualize(args: argparse.Namespace) -> None:
    from tocom.models.hf_load import hf_preprocessing
    from tocom.report.visualize import visualize

    record = None
    if is_hf(args.model):
        from tocom.finetuned import checkpoint_metadata

        record = hf_preprocessing(args.model, checkpoint_metadata(args.checkpoint) if args.checkpoint else {})
    model = patch(_load(args), args.method, trace_source=True)
    model.r = parse_schedule(args.r, dims_of(model))
    print(f"wrote {visualize(model, args.image, args.out, record)}")


def job_config(cls: type, args: argparse.Namespace, **given):
    """A job's config dataclass from parsed flags: each field from the flag of its name (``model_name``
    from ``model``, ``num_workers`` from ``--workers``); a flag left unset (None) keeps the field's
    default, and ``given`` overrides both."""
    flags = {**vars(args), "model_name": args.model, "num_workers": args.workers}
    values = {f.name: flags[f.name] for f in fields(cls) if flags.get(f.name) is not None}
    return cls(**{**values, **given})


def cmd_distill(args: argparse.Namespace) -> None:
    from tocom.jobs.distill import DistillConfig, run_distill
    from tocom.train import distributed

    _, summary = run_distill(job_config(DistillConfig, args))
    if distributed.rank() == 0:
        print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def cmd_adapt(args: argparse.Namespace) -> None:
    from tocom.jobs.adapt import AdaptConfig, run_adapt

    config = AdaptConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                         seed=args.seed, device=args.device)
    _, record = run_adapt(args.model, args.checkpoint, args.plugin, args.data, args.out, config,
                          source=args.source, run_dir=args.run_dir, resume=args.resume)
    kl = record["held_out_kl"]
    mean = {k: sum(v.values()) / len(v) for k, v in kl.items()}
    print(f"wrote {args.out}: adapted to {record['checkpoint']} at source {record['source']} on "
          f"{record['images']} images in {record['wall_s']:.0f} s; held-out KL (mean over degrees) "
          f"no plugin {mean['none']:.4f}, universal {mean['universal']:.4f}, adapted {mean['adapted']:.4f} "
          f"(step {record['picked_step']} of {record['steps']})")


def cmd_finetune(args: argparse.Namespace) -> None:
    from tocom.jobs.finetune import FinetuneConfig, run_finetune
    from tocom.train import distributed

    if args.task == "segmentation":
        if is_hf(args.model):
            raise ValueError("segmentation fine-tuning is not supported for hf: models (its decoder reads "
                             "timm features); fine-tune the timm port of the model")
        cmd_finetune_segmentation(args)
        return
    config = job_config(FinetuneConfig, args, lora_targets=tuple(args.lora_targets))  # "qv" -> q, v
    _, recipe = run_finetune(config)
    if distributed.rank() == 0:
        print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in recipe.items() if k != "curve"))


def cmd_finetune_segmentation(args: argparse.Namespace) -> None:
    from tocom.jobs.segment import SegmentConfig, run_segment_finetune
    from tocom.train import distributed

    if args.modulator_lr is not None:
        raise ValueError("--modulator-lr sets the lr of PYRA's modulators; segmentation has no --method pyra")
    out = args.out if args.out != "finetuned.safetensors" else "segmenter.safetensors"
    _, recipe = run_segment_finetune(job_config(SegmentConfig, args, out=out))
    if distributed.rank() == 0:
        print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in recipe.items() if k != "curve"))


def cmd_eval(args: argparse.Namespace) -> None:
    from tocom.jobs.eval_checkpoint import EvalConfig, run_eval
    from tocom.report.tables import format_table, json_lines

    config = job_config(EvalConfig, args, targets=args.target, scales=args.scale, progress=not args.json)
    rows = run_eval(config)
    print(json_lines(rows) if args.json else format_table(rows))


def cmd_demo(args: argparse.Namespace) -> None:
    from tocom.jobs.demo import run_demo

    run_demo(args.out, checkpoint=args.checkpoint, plugin_file=args.plugin, quick=args.quick,
             shared=args.shared)


def cmd_experiment(args: argparse.Namespace) -> None:
    raise ValueError("the papers' experiments live beside the library now: from a clone of the "
                     f"repository run `python -m research.paper {' '.join(args.rest) or '...'}` "
                     "(the same arguments)")


def build_parser() -> argparse.ArgumentParser:
    from tocom.finetuned import FINETUNE_METHODS
    from tocom.jobs.adapt import AdaptConfig
    from tocom.jobs.finetune import PRESETS

    parser = argparse.ArgumentParser(prog="tocom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="images/s at each r, interleaved with the unpatched model")
    _add_model_args(p)
    p.add_argument("--method", choices=COMPRESSION_METHODS, default="tome")
    p.add_argument("--r", nargs="+", default=["0", "8", "16"], help="schedules: 8, 8,8,4 or flops=0.5")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("delta", help="store a fine-tuned checkpoint as what differs from its base "
                       "(adapters and head: about 0.5 MB for DeiT-Tiny AdaptFormer)")
    p.add_argument("checkpoint", help="the full fine-tuned checkpoint")
    p.add_argument("--base", required=True, help="the checkpoint it was fine-tuned from")
    p.add_argument("--out", required=True, help="the delta file (.safetensors) to write")
    p.set_defaults(func=cmd_delta)

    p = sub.add_parser("distill", help="train a Token Compensator plugin by self-distillation")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="any folder of images (searched recursively)")
    p.add_argument("--method", choices=COMPRESSION_METHODS, default="tome")
    p.add_argument("--mode", choices=["standard", "dense"], default="standard",
                   help="dense: for models that merge before each MLP and unmerge after it "
                        "(segmentation); distilled with L1 on every token's features")
    p.add_argument("--max-r", type=int, default=16, help="largest degree the plugin serves")
    p.add_argument("--groups", type=int, help="low-rank groups (default: --max-r)")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--variant", choices=["standard", "shared", "no_inversion"], default="standard")
    p.add_argument("--loss", choices=["kd", "feat", "ce"], default="kd",
                   help="kd: KL on logits; feat: L1 on the features the head reads; ce needs DIR/labels.txt")
    p.add_argument("--preset", choices=["small", "paper"], default="small")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--epochs", type=int)
    group.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="absolute lr (default from the preset)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--decode-once", action="store_true",
                   help="keep the decoded images in memory (small folders; when decoding bounds a GPU)")
    p.add_argument("--holdout", help="a folder of images not in --data: the loss of each degree pair on "
                                     "it is recorded before, every --eval-every steps and after training")
    p.add_argument("--eval-every", type=int, default=0, help="with --holdout: steps between measurements")
    _add_run_args(p, "compensator.tocom.safetensors")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("adapt", help="adapt a universal plugin to one fine-tuned model, without labels")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--checkpoint", required=True, help="the tocom finetune checkpoint to adapt to")
    p.add_argument("--plugin", required=True, help="the universal plugin to start from")
    p.add_argument("--data", required=True,
                   help="any folder of the task's images (searched recursively; labels are never read)")
    p.add_argument("--source", type=int,
                   help="the model's source degree (default: what the checkpoint records)")
    p.add_argument("--steps", type=int, default=AdaptConfig.steps)
    p.add_argument("--batch-size", type=int, default=AdaptConfig.batch_size)
    p.add_argument("--lr", type=float, default=AdaptConfig.lr)
    p.add_argument("--eval-every", type=int, default=AdaptConfig.eval_every,
                   help="steps between held-out evaluations (the stopping rule)")
    p.add_argument("--out", required=True, help="the adapted plugin file to write")
    p.add_argument("--run-dir", help="checkpoints and metrics (default: OUT.run)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("finetune", help="fine-tune on a labelled dataset under a compression schedule")
    _add_model_args(p)
    p.add_argument("--data", required=True,
                   help="VTAB-1k task folder or ImageFolder splits; for segmentation an ADE20k-layout folder")
    p.add_argument("--task", choices=["classification", "segmentation"], default="classification",
                   help="segmentation: a linear decoder on the ViT, trained on images/ + annotations/")
    p.add_argument("--mode", choices=["dense", "standard"], default="dense",
                   help="segmentation: merge before each MLP and unmerge after it (dense), or merge "
                        "as usual and unmerge the final tokens (standard)")
    p.add_argument("--method", choices=FINETUNE_METHODS,
                   help="default: the preset's (required with small); segmentation: full (default) or lora")
    # --schedule: torchrun's own parser rejects "--r" as an ambiguous abbreviation of its --rdzv-* flags.
    p.add_argument("--r", "--schedule", dest="r",
                   help="schedule: 8, 8,8,4, flops=0.5, low or high (default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float, help="absolute lr (default from the preset)")
    p.add_argument("--modulator-lr", type=float,
                   help="pyra: absolute peak lr of the PYRA modulators (W_r, W_D), on the same warm-up "
                        "and cosine schedule (default: --lr)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (lora, pyra)")
    p.add_argument("--lora-targets", choices=["qkv", "qv"], default="qkv")
    p.add_argument("--bottleneck", type=int, default=32, help="AdaptFormer width")
    p.add_argument("--adapter-scale", type=float, default=0.1, help="AdaptFormer scale s")
    p.add_argument("--split-train", choices=["train", "trainval"], default="train",
                   help="trainval: VTAB-1k final runs (no validation); train: validate on val")
    p.add_argument("--val-every", type=int, help="epochs between validations (default: epochs / 10)")
    p.add_argument("--compression", choices=COMPRESSION_METHODS, default="tome",
                   help="token reduction while fine-tuning: merging (tome, pitome, tofu) or pruning (evit)")
    p.add_argument("--out-format", choices=["tocom", "hf"], default="tocom",
                   help="hf: --out is a transformers save_pretrained folder (hf: models, full or lora)")
    _add_run_args(p, "finetuned.safetensors")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="top-1 (mIoU for segmentation checkpoints) at target degrees, "
                                    "with and without a plugin")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="VTAB-1k task folder or ImageFolder splits")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "trainval"])
    p.add_argument("--resize", choices=["crop", "squash"],
                   help="override the preprocessing the checkpoint records (default: the recorded one)")
    p.add_argument("--method", choices=COMPRESSION_METHODS,
                   help="compression (default: what the checkpoint was fine-tuned with, else tome)")
    p.add_argument("--source", type=int,
                   help="degree the checkpoint was fine-tuned at (default: its metadata, else 0)")
    p.add_argument("--target", type=int, nargs="+", default=[0, 4, 8, 12, 16])
    p.add_argument("--plugin", help="compensator file")
    p.add_argument("--scale", type=float, nargs="+", help="plugin scale(s) s to try")
    p.add_argument("--select-scale-on", choices=["val"], help="pick s per target on this split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="loader workers (default 0: workers compete with the timed forwards for the CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="distil a plugin, fine-tune at r=0, compare degrees with/without it")
    p.add_argument("--checkpoint", help="DeiT-Tiny weights (default: the shared folder's)")
    p.add_argument("--shared", help="folder of the real weights and data, as ../shared is laid out "
                                    "(default: $TOCOM_SHARED; without one, generated tasks)")
    p.add_argument("--plugin", help="use this compensator instead of distilling one")
    p.add_argument("--out", default="demo-out", help="folder for results.json, accuracy.png, models")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test, not a result)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("experiment", help="moved: python -m research.paper, from a clone")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("visualize", help="picture of which patches merged into which token")
    p.add_argument("image")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--checkpoint")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--method", choices=COMPRESSION_METHODS, default="tome")
    p.add_argument("--r", default="16")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=cmd_visualize)
    add_report_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``tocom`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"tocom {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

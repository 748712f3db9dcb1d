"""The ``tocom`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tocom.compress import parse_schedule
from tocom.models import dims_of, patch
from tocom.models.loading import create_model


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("--checkpoint", help="local weights: .safetensors or .pth (loaded with weights_only)")
    p.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")


def _load(args: argparse.Namespace):
    return create_model(args.model, args.checkpoint, pretrained=args.pretrained).eval()


def cmd_bench(args: argparse.Namespace) -> None:
    from tocom.engine.bench import bench
    from tocom.engine.report import format_table, json_lines

    model = _load(args)
    dims = dims_of(model)
    schedules = [parse_schedule(r, dims) for r in args.r]
    rows = bench(model, schedules, args.method, args.batch_size, args.device, rounds=args.rounds,
                 progress=not args.json)
    print(json_lines(r.as_dict() for r in rows) if args.json else format_table([r.as_dict() for r in rows]))


def cmd_visualize(args: argparse.Namespace) -> None:
    from tocom.engine.visualize import visualize

    model = patch(_load(args), args.method, trace_source=True)
    model.r = parse_schedule(args.r, dims_of(model))
    print(f"wrote {visualize(model, args.image, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tocom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="images/s at each r, interleaved with the unpatched model")
    _add_model_args(p)
    p.add_argument("--method", choices=["tome", "evit"], default="tome")
    p.add_argument("--r", nargs="+", default=["0", "8", "16"], help="schedules: 8, 8,8,4 or flops=0.5")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("visualize", help="picture of which patches merged into which token")
    p.add_argument("image")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--method", choices=["tome", "evit"], default="tome")
    p.add_argument("--r", default="16")
    p.add_argument("--out", required=True, help="PNG to write")
    p.set_defaults(func=cmd_visualize)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``tocom`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"tocom {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

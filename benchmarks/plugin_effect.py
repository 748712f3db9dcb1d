"""How much closer a plugin brings a compressed model to its uncompressed self, on held-out images.

    python benchmarks/plugin_effect.py plugins/deit_tiny_patch16_224.tocom.safetensors \\
        --checkpoint ../shared/weights/deit_tiny_patch16_224.safetensors --data ../shared/data/vtab-1k/cifar10

For the off-the-shelf model (source degree 0) it reports, at each target degree and plugin scale,
KL(model at r=0 || model at target) and the top-1 agreement between the two, on images the plugin
never saw (default: every 31st CIFAR-10 test image). Scale 0 is the model without the plugin.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import tocom
from tocom.data import load_dataset
from tocom.finetuned import eval_transform_for
from tocom.models.loading import create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("plugin")
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--every", type=int, default=31, help="use every N-th test image")
    p.add_argument("--targets", type=int, nargs="+", default=[4, 8, 12, 16])
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    args = p.parse_args()
    model = tocom.patch(create_model(args.model, args.checkpoint).eval())
    data = load_dataset(args.data, "test", eval_transform_for(args.checkpoint, model))
    x = torch.stack([data[i][0] for i in range(0, len(data), args.every)])
    plugin = tocom.Compensator.load(args.plugin)
    print(f"{len(x)} held-out images from {args.data}; reference: {args.model} at r = 0")
    print("| target | scale | KL(r=0 || target) | top-1 agreement |\n|---|---|---|---|")
    with torch.inference_mode():
        model.r = 0
        reference = model(x).log_softmax(-1)
        tocom.attach(model, plugin, source=0)
        for target in args.targets:
            for scale in args.scales:
                tocom.set_degree(model, target, scale=scale)
                out = model(x).log_softmax(-1)
                kl = F.kl_div(out, reference, reduction="batchmean", log_target=True).item()
                agree = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
                print(f"| {target} | {scale} | {kl:.4f} | {100 * agree:.1f}% |")


if __name__ == "__main__":
    main()

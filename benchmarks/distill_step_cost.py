"""Cost of one compensator distillation step against the same step with no plugin at all.

    python benchmarks/distill_step_cost.py --model deit_tiny_patch16_224 --batch-size 32 --rounds 7

Both steps run the teacher at src under no_grad and the student at tgt, then back-propagate the
KL loss through the whole student (the plugin's first groups sit in block 0, so a real step must
reach it; the baseline gets the same depth of backward by asking for the input's gradient). The
plugin step adds the fused low-rank products and the AdamW update of the plugin. The pair
sequence is the same for both. Reported: median seconds per step and their ratio (target <= 1.25).
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from tocom.compensator import Compensator, DistillObjective, sample_pair
from tocom.models import patch
from tocom.models.loading import create_model
from tocom.report.bench import time_interleaved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch_size, 3, 224, 224)
    labels = torch.zeros(args.batch_size, dtype=torch.long)

    base = patch(create_model(args.model, args.checkpoint).eval()).requires_grad_(False)
    with_plugin = patch(create_model(args.model, args.checkpoint).eval())
    plugin = Compensator.init_for(with_plugin)
    objective = DistillObjective(with_plugin, plugin).train()
    optimizer = torch.optim.AdamW(plugin.parameters(), lr=1e-4)
    pairs_a, pairs_b = random.Random(0), random.Random(0)

    def baseline_step():
        src, tgt = sample_pair(16, pairs_a)
        base.r = src
        with torch.no_grad():
            teacher = base(x)
        base.r = tgt
        images = x.clone().requires_grad_(True)
        student = base(images)
        F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), reduction="batchmean",
                 log_target=True).backward()

    def plugin_step():
        state = random.getstate()
        random.setstate(pairs_b.getstate())  # the objective draws from the global RNG
        loss, _ = objective((x, labels))
        pairs_b.setstate(random.getstate())
        random.setstate(state)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    times = time_interleaved({"no plugin": baseline_step, "plugin": plugin_step},
                             torch.device("cpu"), rounds=args.rounds)
    ratio = times["plugin"] / times["no plugin"]
    print(f"{args.model}, batch {args.batch_size}, {args.rounds} rounds, {args.threads} threads")
    print(f"| step | s/step |\n|---|---|\n| no plugin | {times['no plugin']:.3f} |\n"
          f"| plugin | {times['plugin']:.3f} |\n| ratio | {ratio:.3f} |")


if __name__ == "__main__":
    main()

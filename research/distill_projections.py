"""Cause test: does the plugin's floor depend on which projections get deltas?

The shipped plugin adds low-rank deltas to W_q and W_v only, as in the paper. This script trains
the same per-degree groups (one group per unit of degree, ``delta(src -> tgt) = sign * s *
sum B_i A_i``, rank 2, s = 0.1) on other sets of Linear layers of a DeiT and scores each on the
held-out KL of :mod:`research.distill_causes` (same images, pairs and budget: 400 steps of 32
images, lr 1e-3, seed 0, light augmentation):

  qv   - q and v of ``attn.qkv``, each with its own factors (the shipped plugin, through this script's own
         hooks: a check that the machinery reproduces the recipe's numbers);
  qkv  - all of ``attn.qkv`` (adds k, which sets the similarity ToMe merges by);
  all  - ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (every Linear of every block);
  mlp  - ``mlp.fc1`` and ``mlp.fc2`` only.

The deltas go in through forward hooks on the Linear modules, so the compressed forward itself is
the library's, unchanged. This is a research probe, not a plugin format: a result here decides
whether the format should grow beyond q and v.

Needs ``python -m research.paper all --stage data --shared ../shared`` (the split of the ImageNet sample)
and the DeiT-Tiny weights in ``../shared``. Each configuration writes ``OUT/proj-NAME.json`` and
is skipped when that exists; a killed run resumes from its checkpoint.

Usage: python research/distill_projections.py [--only qv,all] [--out runs/causes]
(about 13-16 minutes per configuration on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tocom.compensator import Compensator
from tocom.compensator.objective import sample_pair
from tocom.data import eval_transform, train_transform
from tocom.jobs.distill import LabelledFiles, holdout_hook
from tocom.models import patch
from tocom.models.loading import create_model
from tocom.train.config import TrainConfig
from tocom.train.trainer import logged_evals, train

DATA = Path("runs/evidence/paper-mini/distill-data")
WEIGHTS = Path("../shared/weights/deit_tiny_patch16_224.safetensors")
PAIRS = ((0, 16), (16, 0), (0, 8), (8, 16))
CONFIGS = {
    "qv": ("attn.qkv:q,v",),
    "qkv": ("attn.qkv:q,k,v",),
    "all": ("attn.qkv:q,k,v", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}


class ProjectionBank(nn.Module):
    """Per-degree low-rank groups on chosen Linears of every block, added through forward hooks.

    A spec ``path`` gives the Linear (in -> out) one pair of factors: ``A`` (K, h, in), ``B``
    (K, out, h), B starting at zero. ``attn.qkv:q,v`` gives each named third of the fused qkv its
    own pair, as the shipped plugin has for q and v. While ``coeff`` (K,) is set, the hooks add
    ``sum_k c_k B_k A_k x`` to each part's rows of the output, ``x`` (..., in); while it is None
    (the teacher's forward) they add nothing.
    """

    def __init__(self, model: nn.Module, where: tuple[str, ...], groups: int = 16, rank: int = 2,
                 scale: float = 0.1):
        super().__init__()
        self.groups, self.scale = groups, scale
        self.coeff: torch.Tensor | None = None
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for layer, blk in enumerate(model.blocks):
            for spec in where:
                path, _, rows = spec.partition(":")
                linear = blk.get_submodule(path)
                third = linear.out_features // 3
                # (key, first output row, rows) of each part with its own factors
                parts = [(f"{layer}_{path.replace('.', '_')}_{name}", "qkv".index(name) * third, third)
                         for name in rows.split(",")] if rows else \
                        [(f"{layer}_{path.replace('.', '_')}", 0, linear.out_features)]
                for key, _, out in parts:
                    a = torch.empty(groups, rank, linear.in_features)
                    nn.init.kaiming_uniform_(a.view(-1, linear.in_features), a=math.sqrt(5))
                    self.A[key] = nn.Parameter(a)
                    self.B[key] = nn.Parameter(torch.zeros(groups, out, rank))
                linear.register_forward_hook(self._hook(parts))

    def _hook(self, parts: list[tuple[str, int, int]]):
        def add_delta(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor):
            if self.coeff is None:
                return None
            x, c = inputs[0], self.coeff.to(inputs[0].dtype).view(-1, 1)
            pieces = []
            for key, start, rows in parts:
                z = torch.einsum("...i,khi->...kh", x, self.A[key]) * c
                pieces.append((start, rows, torch.einsum("...kh,koh->...o", z, self.B[key])))
            if len(pieces) == 1 and pieces[0][2].shape[-1] == out.shape[-1]:
                return out + pieces[0][2]
            out = out.clone()
            for start, rows, delta in pieces:
                out[..., start:start + rows] += delta
            return out
        return add_delta

    def coefficients(self, source: int, target: int) -> torch.Tensor:
        """(K,) the standard variant's group weights for delta(source -> target)."""
        lo, hi = min(source, target), max(source, target)
        c = torch.zeros(self.groups)
        c[lo:hi] = self.scale if target > source else -self.scale
        return c

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ProjectionObjective(nn.Module):
    """KL(teacher at src || student at tgt plus delta(src -> tgt)): the recipe's loss."""

    def __init__(self, model: nn.Module, bank: ProjectionBank, max_r: int = 16):
        super().__init__()
        model.requires_grad_(False)
        self.model, self.bank, self.max_r = model, bank, max_r

    def train(self, mode: bool = True) -> ProjectionObjective:
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        src, tgt = sample_pair(self.max_r)
        return self.pair_loss(batch[0], batch[1], src, tgt), {"src": float(src), "tgt": float(tgt)}

    def pair_loss(self, images: torch.Tensor, labels: torch.Tensor, src: int, tgt: int) -> torch.Tensor:
        """``images`` (B, 3, H, W); ``labels`` unused (the loss needs no labels)."""
        with torch.no_grad():
            teacher = self.model(images, r=src)
        self.bank.coeff = self.bank.coefficients(src, tgt).to(images.device)
        try:
            student = self.model(images, r=tgt)
        finally:
            self.bank.coeff = None
        return F.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1),
                        reduction="batchmean", log_target=True)


def check_matches_plugin() -> float:
    """The largest output difference between the ``qv`` bank and the shipped plugin's arithmetic
    (:class:`~tocom.compensator.Compensator`) given the same factors, on a random-weight DeiT-Tiny
    at 0 -> 16: the probe's ``qv`` row is the plugin, not an approximation of it."""
    torch.manual_seed(0)
    model = patch(create_model("deit_tiny_patch16_224", None, num_classes=10).eval(), "tome")
    plugin = Compensator.init_for(model)
    nn.init.normal_(plugin.B, std=0.05)
    bank = ProjectionBank(model, CONFIGS["qv"])
    with torch.no_grad():
        for layer in range(len(model.blocks)):
            for p, name in enumerate("qv"):
                bank.A[f"{layer}_attn_qkv_{name}"].copy_(plugin.A[layer, p])
                bank.B[f"{layer}_attn_qkv_{name}"].copy_(plugin.B[layer, p])
        x = torch.randn(2, 3, 224, 224)
        ref, _ = model.forward_tokens(x, r=16, qv_delta=plugin.live_delta(0, 16))
        bank.coeff = bank.coefficients(0, 16)
        got, _ = model.forward_tokens(x, r=16)
    return float((ref - got).abs().max())


def run(name: str, out: Path, steps: int, seed: int) -> dict:
    """Train configuration ``name`` and return its summary with the held-out curve."""
    model = patch(create_model("deit_tiny_patch16_224", str(WEIGHTS)).eval(), "tome")
    torch.manual_seed(seed)
    bank = ProjectionBank(model, CONFIGS[name])
    objective = ProjectionObjective(model, bank)
    data = LabelledFiles(DATA / "train", train_transform("light", model_or_cfg=model), decode_once=True)
    hook = holdout_hook(LabelledFiles(DATA / "holdout", eval_transform(model)), PAIRS, 50)
    config = TrainConfig(steps=steps, lr=1e-3, batch_size=32, weight_decay=0.05, num_workers=1,
                         checkpoint_every=100, eval_every=100, seed=seed)
    run_dir = out / f"proj-{name}.run"
    resume = (run_dir / "last.ckpt").is_file()
    step0 = run_dir / "step0.json"  # compression alone, scored once before the first step
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        step0.write_text(json.dumps({"step": 0, **hook(objective.eval(), 0)}))
    start = time.time()
    result = train(objective, data, config, out_dir=run_dir, resume=resume, device="cpu", evaluate=hook)
    evals = logged_evals(run_dir) if resume else result.evals  # the log keeps those before a kill
    return {"config": name, "linears": list(CONFIGS[name]), "parameters": bank.trainable_count(),
            "steps": steps, "seed": seed, "wall_s": round(time.time() - start, 1),
            "holdout_curve": [json.loads(step0.read_text()), *evals]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="qv,all", help=f"comma-separated configurations of {sorted(CONFIGS)}")
    p.add_argument("--out", type=Path, default=Path("runs/causes"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = args.only.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {sorted(CONFIGS)}")
    for path in (DATA / "train", DATA / "holdout", WEIGHTS):
        if not path.exists():
            p.error(f"{path} is missing: run `python -m research.paper all --stage data --shared "
                    "../shared` and check ../shared")
    torch.set_num_threads(2)
    gap = check_matches_plugin()
    if gap > 1e-5:
        raise SystemExit(f"the qv bank differs from the plugin by {gap:.2e}: the probe is broken")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        path = args.out / f"proj-{name}.json"
        if not path.is_file():
            summary = run(name, args.out, args.steps, args.seed)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(summary, indent=1))
            tmp.replace(path)
        rows.append(json.loads(path.read_text()))
    print("Held-out KL (step 0: compression alone; last: the end of the run)")
    print("| linears | parameters | step | " + " | ".join(f"{a}->{b}" for a, b in PAIRS) + " |")
    print("|---|---|---|" + "---|" * len(PAIRS))
    for row in rows:
        for point in (row["holdout_curve"][0], row["holdout_curve"][-1]):
            print(f"| {row['config']} | {row['parameters']} | {point['step']} | "
                  + " | ".join(f"{point[f'loss_{a}_to_{b}']:.4f}" for a, b in PAIRS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

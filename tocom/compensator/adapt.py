"""Label-free adaptation of a plugin to one fine-tuned model: the objective and its held-out score.

A universal plugin learns the compression gap of the pre-trained backbone on ImageNet. A deployed
model always runs from its own source degree ``s``, so the only deltas it will ever use are
delta(s -> t). Adaptation trains those, on that model (adapters and head included, all frozen) and
on unlabelled images of its task:

- teacher: the model at ``s`` with no delta, the model exactly as it was fine-tuned and validated.
  It is the same for every target, and with no augmentation the same for every epoch, so its
  logits are computed once per image and passed in with the batch (:func:`teacher_logits`);
- student: the model at a target ``t != s`` drawn uniformly from the plugin's degrees, with
  delta(s -> t) added to q and v on the fly;
- loss: KL(teacher || student) on the logits, as in distillation.

Pairs that do not start at ``s`` are never drawn: the model never runs them, and training them
would spend steps on groups' combinations that no switch of this model uses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tocom.compensator.bank import CompensatorBank
from tocom.compensator.fit import check_fits, check_mode
from tocom.models import dims_of, is_patched, patch, require_feature


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over a batch of logits ``(B, classes)``, in float32."""
    return F.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1),
                    reduction="batchmean", log_target=True)


@torch.no_grad()
def teacher_logits(model: nn.Module, images: torch.Tensor, source: int, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``(N, classes)`` float32 logits of ``model`` at degree ``source`` for ``images`` ``(N, 3, H, W)``."""
    out = []
    for i in range(0, len(images), batch_size):
        tokens, state = model.forward_tokens(images[i:i + batch_size].to(device), r=source)
        out.append(model.forward_head(tokens, size=state.size).float().cpu())
    return torch.cat(out)


class AdaptObjective(nn.Module):
    """``objective((images, teacher)) -> (loss, {"tgt": t})``; only the plugin trains.

    ``images``: ``(B, 3, H, W)`` preprocessed as the model's checkpoint records; ``teacher``:
    ``(B, classes)`` logits of the model at ``source`` for the same images.
    """

    def __init__(self, model: nn.Module, plugin: CompensatorBank, source: int,
                 targets: Sequence[int] | None = None):
        super().__init__()
        require_feature(model, "per_call", "plugin adaptation (a per-call q/v delta)")
        check_fits(plugin.spec, model)
        plugin.check_degree(source)
        if dims_of(model).num_classes == 0:
            raise ValueError("adaptation distils the model's logits, and this model has no head; "
                             "load the fine-tuned classifier")
        if not is_patched(model):
            patch(model, plugin.spec.method, mode=plugin.spec.mode)
        elif model._tocom.method != plugin.spec.method:
            raise ValueError(f"the plugin was trained for {plugin.spec.method} but the model is patched for "
                             f"{model._tocom.method}; use a {model._tocom.method} plugin")
        check_mode(plugin.spec, model)
        self.targets = list(targets) if targets is not None else [
            t for t in range(plugin.spec.max_degree + 1) if t != source]
        for t in self.targets:
            plugin.check_degree(t)
        if not self.targets or source in self.targets:
            raise ValueError(f"targets must be degrees other than the source {source}, got {self.targets}")
        model.requires_grad_(False)
        self.model, self.plugin, self.source = model, plugin, source

    def train(self, mode: bool = True) -> AdaptObjective:
        super().train(mode)
        self.model.eval()  # the frozen model never runs dropout or drop-path
        return self

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, teacher = batch
        target = random.choice(self.targets)
        return kl_to_teacher(self.student(images, target), teacher), {"tgt": float(target)}

    def student(self, images: torch.Tensor, target: int, plugin: bool = True) -> torch.Tensor:
        """Logits ``(B, classes)`` of the model at ``target`` with delta(source -> target) (or none)."""
        delta = self.plugin.live_delta(self.source, target) if plugin else None
        tokens, state = self.model.forward_tokens(images, r=target, qv_delta=delta)
        return self.model.forward_head(tokens, size=state.size)

    @torch.no_grad()
    def held_out_kl(self, images: torch.Tensor, teacher: torch.Tensor, targets: Sequence[int],
                    batch_size: int = 64, plugin: bool = True) -> dict[int, float]:
        """Mean KL to the teacher per target on held-out ``images`` ``(N, 3, H, W)``."""
        device = next(self.plugin.parameters()).device
        scores = {}
        for t in targets:
            total = 0.0
            for i in range(0, len(images), batch_size):
                x, y = images[i:i + batch_size].to(device), teacher[i:i + batch_size].to(device)
                total += float(kl_to_teacher(self.student(x, t, plugin), y)) * len(x)
            scores[t] = total / len(images)
        return scores

"""Self-distillation objective that trains a compensator against a frozen backbone.

Each step draws a pair ``src != tgt`` from 0..max_r. The teacher is the backbone at ``src``
(no grad, no delta); the student is the same backbone at ``tgt`` with delta(src -> tgt) added to
q and v on the fly (a per-call ``qv_delta``: nothing is stored on the model between calls).
Loss: KL(teacher || student) on soft targets, L1 on pooled features for a headless backbone, or
two ablations: ``feat``, L1 on the features the head reads even when there is a head (a downstream
model replaces the head, so every feature direction may matter to it, not only those the ImageNet
classifier weighs), and ``ce``, cross-entropy on labels.

A plugin for dense mode (``plugin.spec.mode == "dense"``) is distilled with L1 on the per-token
outputs of ``forward_tokens`` (every token, after the final norm), with or without a head. Dense
consumers (a segmentation decoder) read every token, so every token is supervised; the pre-trained
classifier only ever saw the pooled or class token, so a KL on per-token class predictions would
distil a head applied off its training distribution, and a KL on the image logits would supervise
one token's path alone. L1 rather than MSE, as ToCom uses for headless backbones: less swayed by
the few large-norm outlier tokens of ViTs.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from tocom.compensator.bank import CompensatorBank
from tocom.compensator.fit import check_mode
from tocom.models import is_patched, patch, require_feature

LOSSES = ("kd", "feat", "ce")


def sample_pair(max_r: int, rng: random.Random | None = None) -> tuple[int, int]:
    """A uniform ordered pair of distinct degrees in 0..max_r."""
    rng = rng or random
    src = rng.randint(0, max_r)
    tgt = rng.randint(0, max_r - 1)
    return src, tgt + (tgt >= src)


class DistillObjective(nn.Module):
    """``objective((images, labels)) -> (loss, {"src": s, "tgt": t})``; only the plugin trains."""

    def __init__(self, model: nn.Module, plugin: CompensatorBank, max_r: int | None = None, loss: str = "kd"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.max_r = plugin.spec.max_degree if max_r is None else max_r
        plugin.check_degree(self.max_r)
        # The student runs with a per-call q/v delta; a family without it would silently ignore it.
        require_feature(model, "per_call", "compensator distillation (a per-call q/v delta)")
        if self.max_r < 1:
            raise ValueError("max_r must be >= 1: distillation needs two different degrees")
        if not is_patched(model):
            patch(model, plugin.spec.method, mode=plugin.spec.mode)
        check_mode(plugin.spec, model)
        self.dense = plugin.spec.mode == "dense"
        model.requires_grad_(False)
        self.model = model
        self.plugin = plugin
        self.loss_kind = loss
        self.headless = getattr(model, "num_classes", 0) == 0

    def train(self, mode: bool = True) -> DistillObjective:
        super().train(mode)
        self.model.eval()  # the frozen backbone never runs dropout or drop-path
        return self

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        src, tgt = sample_pair(self.max_r)
        return self.pair_loss(batch[0], batch[1], src, tgt), {"src": float(src), "tgt": float(tgt)}

    def pair_loss(self, images: torch.Tensor, labels: torch.Tensor, src: int, tgt: int) -> torch.Tensor:
        """The loss of the student at ``tgt`` (plus delta(src -> tgt)) against the teacher at ``src``.

        ``images``: ``(B, 3, H, W)``; ``labels``: ``(B,)`` (used by the ``ce`` loss only).
        """
        if self.dense and self.loss_kind != "ce":
            with torch.no_grad():
                teacher, _ = self.model.forward_tokens(images, r=src)
            student, _ = self.model.forward_tokens(images, r=tgt, qv_delta=self.plugin.live_delta(src, tgt))
            return F.l1_loss(student.float(), teacher.float())  # (B, N, C): every token's features
        features = self.loss_kind == "feat"
        with torch.no_grad():
            if features:
                tokens, state = self.model.forward_tokens(images, r=src)
                teacher = self.model.forward_head(tokens, pre_logits=True, size=state.size)
            else:  # not model(images): a Hugging Face model's call returns its output type, not logits
                tokens, state = self.model.forward_tokens(images, r=src)
                teacher = self.model.forward_head(tokens, size=state.size)
        tokens, state = self.model.forward_tokens(images, r=tgt, qv_delta=self.plugin.live_delta(src, tgt))
        student = self.model.forward_head(tokens, pre_logits=features, size=state.size)
        if features:
            loss = F.l1_loss(student.float(), teacher.float())  # (B, C) pooled or class-token features
        elif self.loss_kind == "ce":
            loss = F.cross_entropy(student, labels)
        elif self.headless:
            loss = F.l1_loss(student, teacher)
        else:
            loss = F.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1),
                            reduction="batchmean", log_target=True)
        return loss

    def release(self) -> nn.Module:
        """The backbone, exactly as given (nothing was installed in it); the plugin keeps its weights."""
        return self.model

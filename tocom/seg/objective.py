"""The segmentation training objective for :func:`tocom.train.train`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tocom.data.segmentation import IGNORE_INDEX


class SegmentObjective(nn.Module):
    """``objective((images (B, 3, H, W), masks (B, H, W))) -> (pixel cross-entropy, {"pixel_acc"})``.

    ``model(images)`` must return ``(B, K, H, W)`` logits; pixels equal to ``ignore_index`` count
    neither in the loss nor in the accuracy.
    """

    def __init__(self, model: nn.Module, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.model, self.ignore_index = model, ignore_index

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, masks = batch[0], batch[1]
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)
        keep = masks != self.ignore_index
        acc = (logits.argmax(1) == masks)[keep].float().mean() if keep.any() else loss.new_zeros(())
        return loss, {"pixel_acc": acc}

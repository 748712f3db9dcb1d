"""mIoU from confusion matrices (mmseg's definition), with an ignore index.

A confusion matrix ``C`` is ``(K, K)`` with ``C[t, p]`` = pixels of true class ``t`` predicted as
``p``. IoU of class ``k`` = ``C[k, k] / (row_k + col_k - C[k, k])``; a class absent from both the
truth and the predictions has no IoU (NaN) and is left out of the mean, as in mmseg. The dataset
mIoU sums the confusion matrices of all images first (it is not a mean of per-image mIoUs).
"""

from __future__ import annotations

import numpy as np
import torch

from tocom.data.segmentation import IGNORE_INDEX


def image_confusions(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-image confusion matrices: pred, target ``(B, H, W)`` ints -> ``(B, K, K)`` int64.

    Target pixels equal to ``ignore_index`` are not counted; other targets must lie in ``0..K-1``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    batch = pred.shape[0]
    pred, target = pred.reshape(batch, -1).long(), target.reshape(batch, -1).long()
    keep = target != ignore_index
    if bool(((target < 0) | (target >= num_classes))[keep].any()):
        bad = int(target[keep & ((target < 0) | (target >= num_classes))][0])
        raise ValueError(f"target label {bad} is outside 0..{num_classes - 1} (and not the ignore index "
                         f"{ignore_index})")
    image = torch.arange(batch, device=pred.device)[:, None].expand_as(pred)
    flat = (image * num_classes + target) * num_classes + pred.clamp(0, num_classes - 1)
    counts = torch.bincount(flat[keep], minlength=batch * num_classes * num_classes)
    return counts.view(batch, num_classes, num_classes)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(K, K)`` int64 confusion matrix of predictions and targets of any equal shape ``(B, H, W)``."""
    return image_confusions(pred.reshape(1, -1), target.reshape(1, -1), num_classes, ignore_index)[0]


def iou_per_class(conf: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(..., K, K)`` confusion -> ``(..., K)`` IoU, NaN for classes absent from truth and predictions."""
    conf = np.asarray(conf, dtype=np.float64)
    inter = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-1) + conf.sum(-2) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)


def mean_iou(conf: np.ndarray | torch.Tensor) -> np.ndarray | float:
    """mIoU over the classes that occur, of ``(K, K)`` (a float) or a stack ``(..., K, K)``."""
    iou = iou_per_class(conf)
    present = ~np.isnan(iou)
    with np.errstate(invalid="ignore"):
        out = np.where(present, iou, 0).sum(-1) / present.sum(-1)
    return float(out) if np.ndim(out) == 0 else out

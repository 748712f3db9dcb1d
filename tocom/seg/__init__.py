"""Semantic segmentation on a ViT backbone: a Segmenter-style linear decoder, its training
objective, its checkpoint files and the mIoU metric."""

from tocom.seg.metric import confusion_matrix, image_confusions, iou_per_class, mean_iou
from tocom.seg.model import Segmenter, load_segmenter, save_segmenter
from tocom.seg.objective import SegmentObjective

__all__ = [
    "SegmentObjective", "Segmenter", "confusion_matrix", "image_confusions", "iou_per_class",
    "load_segmenter", "mean_iou", "save_segmenter",
]

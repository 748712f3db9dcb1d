"""Paired bootstrap of a dataset-mIoU difference between two configurations on the same images.

The paired unit is the image; the statistic is the *dataset* mIoU (confusion matrices summed over
the drawn images, then IoU per class, then the mean over classes present), recomputed for A and B
on the same draw of images. We bootstrap that rather than the mean of per-image mIoUs because mIoU
is a ratio of sums over the whole set: a per-image mIoU weighs a 3-pixel class in one image like
the whole background of another, and skips classes absent from an image, so its mean estimates a
different number from the one reported. :func:`tocom.report.stats.paired_difference` is built for
0/1 outcomes per image (accuracy, McNemar); it has no per-image 0/1 outcome to use here, so this
module shares its conventions (percentile interval, fixed seed, ``PairedDifference`` result) and
its Markdown table instead. McNemar has no analogue for mIoU and is left empty.
"""

from __future__ import annotations

import numpy as np

from tocom.report.stats import RESAMPLES, SEED, PairedDifference
from tocom.seg.metric import mean_iou

_CHUNK = 2_000  # resamples per block: bounds the (chunk, images) draw matrix


def _check(conf: np.ndarray, name: str) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 3 or conf.shape[1] != conf.shape[2]:
        raise ValueError(f"{name}: expected per-image confusion matrices (N, K, K), got {conf.shape}")
    return conf.astype(np.float64)


def paired_miou_difference(conf_a: np.ndarray, conf_b: np.ndarray, *, confidence: float = 0.95,
                           n_resamples: int = RESAMPLES, seed: int = SEED) -> PairedDifference:
    """Dataset mIoU of A and B, the difference B - A and its paired bootstrap percentile interval.

    Args:
        conf_a, conf_b: ``(N, K, K)`` per-image confusion matrices of the same N images, same order.
    """
    a, b = _check(conf_a, "A"), _check(conf_b, "B")
    if a.shape != b.shape:
        raise ValueError(f"A has {a.shape} but B has {b.shape}: a paired comparison needs the same "
                         "images in the same order")
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images to bootstrap, got {n}")
    if not 0 < confidence < 1 or n_resamples < 100:
        raise ValueError("need 0 < confidence < 1 and n_resamples >= 100")
    miou_a, miou_b = float(mean_iou(a.sum(0))), float(mean_iou(b.sum(0)))
    flat_a, flat_b = a.reshape(n, -1), b.reshape(n, -1)
    k = a.shape[1]
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        r = min(_CHUNK, n_resamples - start)
        draw = rng.integers(0, n, (r, n))
        counts = np.zeros((r, n))
        np.add.at(counts, (np.arange(r)[:, None], draw), 1.0)  # times each image was drawn
        ma = mean_iou((counts @ flat_a).reshape(r, k, k))
        mb = mean_iou((counts @ flat_b).reshape(r, k, k))
        diffs[start:start + r] = mb - ma
    low, high = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return PairedDifference(accuracy_a=miou_a, accuracy_b=miou_b, difference=miou_b - miou_a,
                            ci_low=float(low), ci_high=float(high), n_images=n, n_seeds=1, n_strata=1,
                            mcnemar=(), confidence=confidence, n_resamples=n_resamples,
                            scheme="images (dataset mIoU)")

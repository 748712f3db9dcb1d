"""Paired statistics for accuracy differences: bootstrap confidence intervals and exact McNemar tests.

Two configurations A and B (say, a model at r = 16 without and with its plugin) are evaluated on
the same images, so their per-image outcomes are paired. The quantity of interest is the accuracy
difference ``B - A``; its uncertainty comes from which images were drawn and, when there are
several replicate runs (fine-tuning or plugin seeds), from which runs were drawn.

Inputs are per-image correctness arrays: ``(N,)`` for one run or ``(S, N)`` for S replicate runs
on the same N images, row ``s`` of A paired with row ``s`` of B.

Bootstrap scheme (percentile intervals, fixed seed, so a rerun gives the same interval):

- One run per image set: the image indices are resampled with replacement, A and B together
  (a paired bootstrap of the per-image difference), via :func:`scipy.stats.bootstrap`.
- Several runs: two-stage resampling. Each bootstrap replicate draws S runs with replacement and,
  independently, N images with replacement; the statistic is the mean difference over every drawn
  (run, image) cell. Images are *crossed* with runs (every run sees the same images), so one image
  draw is shared by all drawn runs. This keeps both sources of variation in the interval. With
  very few runs (2-3) the run-level part is itself coarse and the interval tends to be somewhat
  too narrow; read it as a lower bound on the uncertainty.
- Several image sets (tasks): each set is a stratum, resampled independently as above; the pooled
  statistic is the unweighted mean of the per-stratum differences (every task counts equally).

Percentile rather than BCa: with few discordant images BCa can place an end outside the values
the statistic can take, and it has no two-stage analogue, so both paths use the same method.

The exact McNemar test is the two-sided binomial test (p = 1/2) on the discordant images: those
only A got right against those only B got right. It is reported per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

RESAMPLES = 10_000
SEED = 0
_CHUNK_BYTES = 20_000_000  # bounds the memory of one block of resamples


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of one run: discordant counts and the two-sided p-value."""

    a_only: int  # images A classified correctly and B did not
    b_only: int  # images B classified correctly and A did not
    p: float


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of A and B, the difference B - A and its bootstrap confidence interval.

    Accuracies and differences are fractions (0.012 = 1.2 points). ``n_images`` and ``n_seeds``
    are totals over strata; ``mcnemar`` has one entry per run, stratum by stratum.
    """

    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    n_images: int
    n_seeds: int
    n_strata: int
    mcnemar: tuple[McNemar, ...]
    confidence: float
    n_resamples: int
    scheme: str  # "images" or "seeds+images"

    @property
    def mcnemar_p(self) -> tuple[float, ...]:
        return tuple(m.p for m in self.mcnemar)

    @property
    def a_only(self) -> int:
        return sum(m.a_only for m in self.mcnemar)

    @property
    def b_only(self) -> int:
        return sum(m.b_only for m in self.mcnemar)

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict:
        """JSON-ready, with McNemar results as plain dicts."""
        out = asdict(self)
        out["mcnemar"] = [asdict(m) for m in self.mcnemar]
        return out


def _correctness(x: ArrayLike, name: str) -> np.ndarray:
    """``(N,)`` or ``(S, N)`` booleans or 0/1 integers -> ``(S, N)`` bool."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected per-image correctness of shape (N,) or (S, N), got {arr.shape}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.integer) or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name}: correctness must be booleans or 0/1 integers, got {arr.dtype}; "
                             "to compare predictions use compare_predictions(pred_a, pred_b, labels)")
        arr = arr.astype(bool)
    return arr


def _pair(correct_a: ArrayLike, correct_b: ArrayLike, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    a, b = _correctness(correct_a, f"A{where}"), _correctness(correct_b, f"B{where}")
    if a.shape != b.shape:
        raise ValueError(f"A{where} has shape {a.shape} (runs, images) but B has {b.shape}: a paired "
                         "comparison needs the same runs evaluated on the same images in the same order")
    if a.shape[1] < 2:
        raise ValueError(f"need at least 2 images to bootstrap{where}, got {a.shape[1]}")
    return a, b


def mcnemar(correct_a: ArrayLike, correct_b: ArrayLike) -> McNemar:
    """Exact two-sided McNemar test for one run: ``correct_a``, ``correct_b`` of shape ``(N,)``."""
    a, b = _correctness(correct_a, "A"), _correctness(correct_b, "B")
    if a.shape != b.shape or a.shape[0] != 1:
        raise ValueError(f"mcnemar compares one run: need two (N,) vectors of equal length, "
                         f"got {np.shape(correct_a)} and {np.shape(correct_b)}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    if a_only + b_only == 0:
        return McNemar(0, 0, 1.0)
    p = stats.binomtest(b_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    return McNemar(a_only, b_only, float(p))


def _mean_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return sum(s.mean(axis=axis) for s in samples) / len(samples)


def _image_bootstrap(diffs: list[np.ndarray], confidence: float, n_resamples: int, seed: int):
    """One run per stratum: scipy's bootstrap, each stratum's images resampled independently."""
    samples = tuple(d[0].astype(np.float64) for d in diffs)
    batch = max(1, _CHUNK_BYTES // (8 * sum(s.size for s in samples)))
    res = stats.bootstrap(samples, _mean_of_means, n_resamples=n_resamples, batch=batch,
                          confidence_level=confidence, method="percentile", vectorized=True,
                          paired=False, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def two_stage_means(strata: Sequence[Sequence[np.ndarray]], n_resamples: int = RESAMPLES,
                    seed: int = SEED) -> np.ndarray:
    """Two-stage bootstrap replicates of pooled means: ``(n_resamples, k)``.

    Each stratum is ``k`` arrays of shape ``(S, N)`` (S runs crossed with N images; row ``s`` of
    every array is the same replicate unit). Each replicate draws S runs and N images with
    replacement per stratum, shared by that stratum's ``k`` arrays, and gives, for each array, the
    unweighted mean over strata of its mean over the drawn cells. A statistic of several means (a
    ratio of two differences, say) is then computed per replicate.
    """
    rng = np.random.default_rng(seed)
    pooled = np.zeros((n_resamples, len(strata[0])))
    for arrays in strata:
        runs, images = arrays[0].shape
        if any(a.shape != (runs, images) for a in arrays):
            raise ValueError(f"a stratum's arrays must share one shape, got {[a.shape for a in arrays]}")
        chunk = max(1, _CHUNK_BYTES // (8 * images))  # rows of int64 image draws per block
        for start in range(0, n_resamples, chunk):
            r = min(chunk, n_resamples - start)
            run_draw = rng.integers(0, runs, (r, runs))
            image_draw = rng.integers(0, images, (r, images))
            for j, a in enumerate(arrays):
                # (r, S): each run summed over the image draw; one 1-D gather per run is the fast layout
                per_run = np.stack([row[image_draw].sum(axis=1, dtype=np.int64) for row in a], axis=1)
                picked = np.take_along_axis(per_run, run_draw, axis=1)  # (r, S): the drawn runs
                pooled[start:start + r, j] += picked.sum(axis=1) / (runs * images)
    return pooled / len(strata)


def _two_stage_bootstrap(diffs: list[np.ndarray], confidence: float, n_resamples: int, seed: int):
    """Runs, then images (crossed), per stratum; percentile interval of the mean over strata."""
    pooled = two_stage_means([(d,) for d in diffs], n_resamples, seed)[:, 0]  # d: (S, N) in {-1, 0, 1}
    low, high = np.quantile(pooled, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def pooled_difference(
    strata: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    confidence: float = 0.95,
    n_resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedDifference:
    """Difference B - A pooled over strata (e.g. tasks), each its own image set.

    Each stratum is ``(correct_a, correct_b)``, both ``(N_k,)`` or ``(S_k, N_k)`` booleans. The
    pooled accuracy is the unweighted mean over strata of the mean over runs; the interval comes
    from the bootstrap described in the module docstring.
    """
    if not strata:
        raise ValueError("no strata to compare: pass at least one (correct_a, correct_b) pair")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples={n_resamples} is too few for a percentile interval; use >= 100")
    pairs = [_pair(a, b, f" (stratum {k})" if len(strata) > 1 else "") for k, (a, b) in enumerate(strata)]
    diffs = [b.astype(np.int8) - a.astype(np.int8) for a, b in pairs]
    accuracy_a = float(np.mean([a.mean() for a, _ in pairs]))
    accuracy_b = float(np.mean([b.mean() for _, b in pairs]))
    difference = float(np.mean([d.mean() for d in diffs]))
    several_runs = any(d.shape[0] > 1 for d in diffs)
    if all((d == d.flat[0]).all() for d in diffs):
        low = high = difference  # every resample gives the same value; scipy would warn and return nan
    elif several_runs:
        low, high = _two_stage_bootstrap(diffs, confidence, n_resamples, seed)
    else:
        low, high = _image_bootstrap(diffs, confidence, n_resamples, seed)
    return PairedDifference(
        accuracy_a=accuracy_a,
        accuracy_b=accuracy_b,
        difference=difference,
        ci_low=low,
        ci_high=high,
        n_images=sum(d.shape[1] for d in diffs),
        n_seeds=sum(d.shape[0] for d in diffs),
        n_strata=len(diffs),
        mcnemar=tuple(mcnemar(ra, rb) for a, b in pairs for ra, rb in zip(a, b)),
        confidence=confidence,
        n_resamples=n_resamples,
        scheme="seeds+images" if several_runs else "images",
    )


def paired_difference(
    correct_a: ArrayLike,
    correct_b: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedDifference:
    """Difference B - A on one image set: ``correct_a``, ``correct_b`` of shape ``(N,)`` or ``(S, N)``."""
    return pooled_difference([(correct_a, correct_b)], confidence=confidence, n_resamples=n_resamples,
                             seed=seed)


def correctness(pred: ArrayLike, labels: ArrayLike, name: str = "predictions") -> np.ndarray:
    """``pred`` ``(N,)`` or ``(S, N)`` class indices against ``labels`` ``(N,)`` -> bool of pred's shape."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {labels.shape}")
    if pred.ndim not in (1, 2) or pred.shape[-1] != labels.shape[0]:
        raise ValueError(f"{name} have shape {pred.shape} but there are {labels.shape[0]} labels: "
                         "predictions and labels must cover the same images in the same order")
    for what, arr in ((name, pred), ("labels", labels)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what} must be integer class indices, got dtype {arr.dtype}")
    return pred == labels


def compare_predictions(
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    labels: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedDifference:
    """:func:`paired_difference` from class predictions ``(N,)`` or ``(S, N)`` and labels ``(N,)``."""
    return paired_difference(correctness(pred_a, labels, "A's predictions"),
                             correctness(pred_b, labels, "B's predictions"),
                             confidence=confidence, n_resamples=n_resamples, seed=seed)

"""Paired bootstrap intervals and exact McNemar tests, checked against independent computations."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
from scipy import stats

from tocom.report.stats import compare_predictions, mcnemar, paired_difference, pooled_difference


def _pairs(a_only: int, b_only: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, dtype=bool)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, dtype=bool)
    return a, b


def _two_sided_binomial(k: int, n: int) -> float:
    """Exact two-sided sign-test p by hand: twice the smaller tail of Binomial(n, 1/2), capped at 1."""
    tail = sum(comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_mcnemar_matches_hand_computed_binomial_sum():
    a, b = _pairs(a_only=1, b_only=6, both=5, neither=3)
    m = mcnemar(a, b)
    assert (m.a_only, m.b_only) == (1, 6)
    assert m.p == pytest.approx(2 * (1 + 7) / 128)  # 2 * P(X <= 1), X ~ Bin(7, 1/2)
    a, b = _pairs(a_only=12, b_only=3, both=40, neither=9)
    assert mcnemar(a, b).p == pytest.approx(_two_sided_binomial(3, 15))
    swapped = mcnemar(b, a)
    assert (swapped.a_only, swapped.b_only, swapped.p) == (3, 12, pytest.approx(_two_sided_binomial(3, 15)))


def test_mcnemar_without_discordant_images_is_one():
    a, b = _pairs(a_only=0, b_only=0, both=7, neither=2)
    assert mcnemar(a, b) == mcnemar(a, a)
    assert mcnemar(a, b).p == 1.0 and mcnemar(a, b).a_only == mcnemar(a, b).b_only == 0


def test_identical_vectors_give_exactly_zero_interval():
    rng = np.random.default_rng(0)
    one = rng.random(300) < 0.7
    runs = rng.random((3, 300)) < 0.7
    for result in (
        paired_difference(one, one),
        paired_difference(runs, runs),
        pooled_difference([(one, one), (runs, runs)]),
    ):
        assert (result.difference, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)
        assert all(p == 1.0 for p in result.mcnemar_p)


def test_large_difference_excludes_zero_and_small_random_one_includes_it():
    a, b = _pairs(a_only=4, b_only=80, both=200, neither=116)
    big = paired_difference(a, b)
    assert big.difference == pytest.approx(76 / 400)
    assert 0 < big.ci_low < big.difference < big.ci_high and big.excludes_zero
    assert big.mcnemar_p[0] < 1e-15
    rng = np.random.default_rng(1)
    small = paired_difference(rng.random(500) < 0.7, rng.random(500) < 0.7)
    assert small.ci_low < 0 < small.ci_high and not small.excludes_zero
    assert small.mcnemar_p[0] > 0.05


def test_single_run_interval_width_matches_normal_approximation():
    a, b = _pairs(a_only=40, b_only=70, both=600, neither=290)
    r = paired_difference(a, b)
    d = b.astype(float) - a
    half_width = stats.norm.ppf(0.975) * d.std() / np.sqrt(d.size)  # Wald interval of a paired mean
    assert (r.ci_high - r.ci_low) / 2 == pytest.approx(half_width, rel=0.1)
    assert r.ci_low < r.difference < r.ci_high
    assert (r.accuracy_a, r.accuracy_b, r.n_images, r.n_seeds, r.scheme) == (0.64, 0.67, 1000, 1, "images")
    assert paired_difference(a, b).ci_low == r.ci_low  # fixed seed: reruns agree exactly


def test_runs_that_agree_add_no_run_level_width():
    a, b = _pairs(a_only=30, b_only=60, both=300, neither=110)
    image_only = paired_difference(a, b)
    two_stage = paired_difference(np.tile(a, (4, 1)), np.tile(b, (4, 1)))
    assert two_stage.scheme == "seeds+images" and two_stage.n_seeds == 4
    assert two_stage.difference == image_only.difference
    width = two_stage.ci_high - two_stage.ci_low
    assert width == pytest.approx(image_only.ci_high - image_only.ci_low, rel=0.08)
    assert len(two_stage.mcnemar) == 4 and two_stage.a_only == 4 * 30


def test_pooled_difference_weights_strata_equally():
    s1 = _pairs(a_only=10, b_only=30, both=50, neither=10)  # +0.2 on 100 images
    s2 = _pairs(a_only=20, b_only=20, both=300, neither=60)  # 0 on 400 images
    r = pooled_difference([s1, s2])
    assert r.difference == pytest.approx(0.1)
    assert r.accuracy_a == pytest.approx((0.6 + 0.8) / 2) and r.n_images == 500 and r.n_strata == 2
    assert r.ci_low < 0.1 < r.ci_high


def test_coverage_single_run_close_to_nominal():
    """Synthetic paired outcomes with known difference 0.05; the 95% interval should cover it ~95%."""
    rng = np.random.default_rng(123)
    hits, trials = 0, 120
    for k in range(trials):
        cell = rng.choice(4, size=200, p=[0.6, 0.05, 0.1, 0.25])  # both, A only, B only, neither
        a, b = (cell == 0) | (cell == 1), (cell == 0) | (cell == 2)
        r = paired_difference(a, b, n_resamples=1000, seed=k)
        hits += r.ci_low <= 0.05 <= r.ci_high
    assert 0.88 <= hits / trials <= 0.99


def test_coverage_with_run_to_run_variation_needs_the_run_level():
    """Runs differ in their true gain; resampling images alone undercovers, two-stage does not."""
    rng = np.random.default_rng(7)
    two_stage_hits = image_only_hits = 0
    trials, runs, images = 80, 8, 200
    for k in range(trials):
        difficulty = rng.random(images)  # crossed design: every run sees the same images
        p_a = 0.7 + rng.normal(0, 0.03, runs)
        gain = rng.normal(0.05, 0.05, runs)  # the truth is the mean gain over runs, 0.05
        a = difficulty < p_a[:, None]
        b = difficulty < (p_a + gain)[:, None]
        r = paired_difference(a, b, n_resamples=1000, seed=k)
        two_stage_hits += r.ci_low <= 0.05 <= r.ci_high
        per_image = (b.astype(float) - a).mean(axis=0)
        ci = stats.bootstrap((per_image,), np.mean, n_resamples=1000, method="percentile", rng=k)
        image_only_hits += ci.confidence_interval.low <= 0.05 <= ci.confidence_interval.high
    assert two_stage_hits / trials >= 0.85
    assert image_only_hits / trials <= two_stage_hits / trials - 0.15


def test_compare_predictions_counts_correct_images():
    labels = np.array([0, 1, 2, 3, 4, 5])
    pred_a = np.array([0, 1, 9, 9, 4, 9])
    pred_b = np.array([0, 9, 2, 3, 4, 9])
    r = compare_predictions(pred_a, pred_b, labels)
    assert (r.a_only, r.b_only) == (1, 2)
    assert (r.accuracy_a, r.accuracy_b) == (pytest.approx(0.5), pytest.approx(4 / 6))


def test_bad_input_is_refused_with_a_reason():
    a = np.ones(10, dtype=bool)
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, np.ones(9, dtype=bool))
    with pytest.raises(ValueError, match="same runs"):
        paired_difference(np.ones((2, 10), bool), np.ones((3, 10), bool))
    with pytest.raises(ValueError, match="0/1"):
        paired_difference(np.full(10, 2), a)
    with pytest.raises(ValueError, match="at least 2 images"):
        paired_difference(a[:1], a[:1])
    with pytest.raises(ValueError, match="labels"):
        compare_predictions(np.zeros(10, int), np.zeros(10, int), np.zeros(9, int))
    with pytest.raises(ValueError, match="integer class"):
        compare_predictions(np.zeros(10), np.zeros(10, int), np.zeros(10, int))
    with pytest.raises(ValueError, match="confidence"):
        paired_difference(a, a, confidence=95)
    with pytest.raises(ValueError, match="no strata"):
        pooled_difference([])
    with pytest.raises(ValueError, match="one run"):
        mcnemar(np.ones((2, 10), bool), np.ones((2, 10), bool))


def test_two_stage_means_draw_runs_shared_by_a_strata_arrays():
    from tocom.report.stats import two_stage_means

    n = 40
    base = np.zeros((2, n), dtype=bool)
    plug = np.stack([np.ones(n, bool), np.zeros(n, bool)])  # run 0 closes the whole gap, run 1 none
    matched = np.ones((2, n), dtype=bool)
    means = two_stage_means([(base, plug, matched)], n_resamples=4000, seed=1)
    assert means.shape == (4000, 3)
    assert (means[:, 0] == 0).all() and (means[:, 2] == 1).all()
    # each row is constant over images, so only the run draw matters: {0, 0.5, 1} w.p. 1/4, 1/2, 1/4
    values, counts = np.unique(means[:, 1], return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    # two strata: the pooled mean is their unweighted mean
    other = two_stage_means([(base, plug, matched), (matched[:, :10], matched[:, :10], matched[:, :10])],
                            n_resamples=100)
    assert (other[:, 0] == 0.5).all()
    with pytest.raises(ValueError, match="share one shape"):
        two_stage_means([(base, plug[:, :10])])


def test_two_stage_interval_is_unchanged_by_the_shared_means_helper():
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 200)) < 0.7, rng.random((3, 200)) < 0.75
    from tocom.report.stats import _two_stage_bootstrap, two_stage_means

    d = b.astype(np.int8) - a.astype(np.int8)
    low, high = _two_stage_bootstrap([d], 0.95, 2000, 0)
    means = two_stage_means([(a, b)], n_resamples=2000, seed=0)
    gain = means[:, 1] - means[:, 0]
    assert (low, high) == pytest.approx(tuple(np.quantile(gain, [0.025, 0.975])), abs=1e-12)

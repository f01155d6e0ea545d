"""training/eval_metrics.py against independent computations (scipy.stats, hand-built masks, formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, stats

from octopus_rt.training import eval_metrics as metrics


def test_wilson_matches_textbook_formula():
    # Wilson (1927) interval written out independently: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z = stats.norm.ppf(0.975)
    for k, n in [(0, 10), (3, 10), (10, 10), (45, 60), (1, 1)]:
        p = k / n
        a = p + z * z / (2 * n)
        b = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        c = 1 + z * z / n
        low, high = metrics.wilson_interval(k, n)
        assert low == pytest.approx(max(0.0, (a - b) / c), abs=1e-12)
        assert high == pytest.approx(min(1.0, (a + b) / c), abs=1e-12)
    # Unlike the Wald interval, Wilson's never collapses at 0 successes.
    low, high = metrics.wilson_interval(0, 10)
    assert low == 0.0 and high > 0.2
    assert math.isnan(metrics.wilson_interval(0, 0)[0])
    with pytest.raises(ValueError):
        metrics.wilson_interval(5, 4)


def test_proportion_estimate():
    est = metrics.proportion([True, False, True, True])
    assert est.value == 0.75 and est.n == 4 and est.method == "wilson"
    assert (est.low, est.high) == pytest.approx(metrics.wilson_interval(3, 4))
    assert metrics.proportion([]).n == 0


def test_bootstrap_mean_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(0.4, 0.2, size=200)
    a = metrics.bootstrap_mean(values, seed=3)
    b = metrics.bootstrap_mean(values, seed=3)
    assert a == b
    assert a.value == pytest.approx(values.mean())
    assert a.low < values.mean() < a.high
    # The percentile interval's width is close to the normal-theory width 2 * 1.96 * s / sqrt(n).
    expected = 2 * 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert (a.high - a.low) == pytest.approx(expected, rel=0.2)


def test_mask_iou_hand_built():
    gt = np.zeros((10, 10), bool)
    gt[0:4, 0:5] = True  # 20 px
    pred = np.zeros((10, 10), bool)
    pred[2:6, 0:5] = True  # 20 px, 10 overlap
    assert metrics.mask_iou(pred, gt) == pytest.approx(10 / 30)
    assert metrics.mask_iou(gt, gt) == 1.0
    assert metrics.mask_iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0  # empty union
    assert metrics.mask_iou(None, gt) == 0.0
    with pytest.raises(ValueError):
        metrics.mask_iou(np.zeros((3, 3), bool), gt)


def test_oracle_point_is_inside_and_farthest_from_border():
    mask = np.zeros((40, 60), bool)
    mask[5:35, 10:20] = True  # thin bar
    mask[10:30, 30:58] = True  # wider block, touching nothing
    x, y = metrics.oracle_point(mask)
    xi, yi = int(x), int(y)
    assert mask[yi, xi]
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    assert distance[yi, xi] == distance.max()
    assert 30 <= xi < 58  # the block is wider than the bar, so its interior is farther from a border
    # A mask touching the image edge: the edge counts as border, so the point is not on the edge.
    edge = np.zeros((20, 20), bool)
    edge[:, :10] = True
    ex, _ = metrics.oracle_point(edge)
    assert 3 <= ex <= 7
    with pytest.raises(ValueError):
        metrics.oracle_point(np.zeros((4, 4), bool))


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=80)
    mos = 2 * pred + rng.normal(scale=1.0, size=80)
    pred_ties = np.round(pred, 1)
    assert metrics.plcc(pred, mos) == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-12)
    assert metrics.srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
    assert metrics.srcc(pred_ties, mos) == pytest.approx(stats.spearmanr(pred_ties, mos)[0], abs=1e-12)
    assert np.allclose(metrics.rankdata(pred_ties), stats.rankdata(pred_ties))
    assert math.isnan(metrics.plcc([1, 1, 1], [1, 2, 3]))


def test_logistic_fit_recovers_a_monotone_nonlinearity():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, size=300)
    truth = (1, 5, 0.5, 0.1)  # b1 < b2 is allowed: a decreasing curve flips the sign of b1 - b2
    y = metrics.logistic4(x, *truth) + rng.normal(scale=0.05, size=x.size)
    fitted = metrics.plcc_fitted(x, y)
    raw = stats.pearsonr(x, y)[0]
    assert fitted > raw  # the fit linearises the S-curve
    params = metrics.fit_logistic4(x, y)
    assert stats.pearsonr(metrics.logistic4(x, *params), y)[0] == pytest.approx(fitted, abs=1e-12)


def test_distortion_keywords_prefers_longest_names():
    text = "The region shows insufficient brightness and some blur, plus color quantization."
    assert metrics.distortion_keywords(text) == {"insufficient brightness", "blur", "color quantization"}
    assert metrics.distortion_keywords("Blurry? no: NOISE.") == {"noise"}  # word boundaries
    p, r = metrics.keyword_precision_recall({"blur", "noise"}, {"blur"})
    assert (p, r) == (0.5, 1.0)
    assert metrics.keyword_precision_recall(set(), {"blur"}) == (None, 0.0)

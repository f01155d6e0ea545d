"""Evaluation metrics in numpy / scipy: intervals, masks, correlations and keyword matching.

Used by `octopus-rt eval` (training/evaluate.py). (training/validation_metrics.py holds the trainer's
own teacher-forced validation metrics.) Everything here is pure and deterministic (bootstrap resampling
takes an explicit seed). Masks are (H, W) bool arrays in the original image's pixel frame; points
are (x, y) pixels with the origin at the top left corner.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from octopus_rt import vocab

__all__ = [
    "Estimate",
    "Z95",
    "wilson_interval",
    "proportion",
    "bootstrap_mean",
    "mask_iou",
    "oracle_point",
    "rankdata",
    "srcc",
    "plcc",
    "logistic4",
    "fit_logistic4",
    "plcc_fitted",
    "distortion_keywords",
    "keyword_precision_recall",
]

# Two-sided 95 % normal quantile, Phi^-1(0.975).
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """One reported figure: `value` over `n` samples with a 95 % interval [low, high].

    method: "wilson" (proportions), "bootstrap" (means; seeded percentile bootstrap), "none"
    (correlations: no interval is computed) or "n/a" (n == 0: value and interval are NaN).
    """

    value: float
    n: int
    low: float
    high: float
    method: str

    def to_json(self) -> dict:
        def clean(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        return {"value": clean(self.value), "n": self.n, "ci95": [clean(self.low), clean(self.high)],
                "ci_method": self.method}


EMPTY = Estimate(float("nan"), 0, float("nan"), float("nan"), "n/a")


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (successes out of n). n == 0 gives (nan, nan)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(flags: Iterable[bool]) -> Estimate:
    """Fraction of True flags with its Wilson 95 % interval."""
    values = [bool(f) for f in flags]
    if not values:
        return EMPTY
    k, n = sum(values), len(values)
    low, high = wilson_interval(k, n)
    return Estimate(k / n, n, low, high, "wilson")


def bootstrap_mean(values: Iterable[float], *, seed: int = 0, n_boot: int = 2000) -> Estimate:
    """Mean with a seeded percentile-bootstrap 95 % interval (n_boot resamples with replacement)."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return EMPTY
    mean = float(data.mean())
    if data.size == 1:
        return Estimate(mean, 1, mean, mean, "bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(n_boot, data.size))
    means = data[idx].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return Estimate(mean, int(data.size), float(low), float(high), "bootstrap")


def mask_iou(pred: np.ndarray | None, gt: np.ndarray) -> float:
    """|pred & gt| / |pred | gt| of two (H, W) bool masks; an empty union counts as 1 (paper metric).

    pred None (no mask produced) counts as an empty prediction.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.zeros_like(gt) if pred is None else np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def oracle_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel of a (H, W) bool mask farthest from the mask's border: argmax of the Euclidean
    distance transform, the image edge counting as border (the mask is padded with False).

    Returns (x, y) at the pixel centre (+0.5), in the mask's pixel frame. Ties go to the first pixel
    in row-major order, so the result is deterministic.
    """
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("oracle point of an empty mask")
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return float(x) + 0.5, float(y) + 0.5


def rankdata(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's "average" method), float64."""
    data = np.asarray(values, dtype=np.float64)
    order = np.argsort(data, kind="mergesort")
    sorted_values = data[order]
    ranks = np.empty(data.size, dtype=np.float64)
    start = 0
    while start < data.size:
        stop = start + 1
        while stop < data.size and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def plcc(pred: Sequence[float], target: Sequence[float]) -> float:
    """Pearson linear correlation; NaN when either side is constant or has fewer than 2 values."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"length mismatch: {x.shape} vs {y.shape}")
    if x.size < 2:
        return float("nan")
    x = x - x.mean()
    y = y - y.mean()
    denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float("nan") if denom == 0 else float(np.dot(x, y) / denom)


def srcc(pred: Sequence[float], target: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    return plcc(rankdata(pred), rankdata(target))


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """4-parameter logistic (VQEG): (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    z = np.clip(-(np.asarray(x, dtype=np.float64) - b3) / (abs(b4) + 1e-12), -500.0, 500.0)
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


def fit_logistic4(pred: Sequence[float], target: Sequence[float]) -> np.ndarray | None:
    """Least-squares fit of logistic4 mapping predictions to MOS; None when the fit fails."""
    from scipy.optimize import OptimizeWarning, curve_fit

    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.size < 5 or np.ptp(x) == 0:
        return None
    start = [float(y.max()), float(y.min()), float(np.median(x)), float(np.std(x)) or 1.0]
    try:
        with warnings.catch_warnings():
            # An unestimable covariance does not matter: only the fitted curve is used.
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(logistic4, x, y, p0=start, maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return params


def plcc_fitted(pred: Sequence[float], target: Sequence[float]) -> float:
    """PLCC after a 4-parameter logistic fit of the predictions to the targets (NaN if no fit)."""
    params = fit_logistic4(pred, target)
    if params is None:
        return float("nan")
    return plcc(logistic4(np.asarray(pred, dtype=np.float64), *params), target)


def _keyword_patterns() -> list[tuple[str, re.Pattern[str]]]:
    # Longest names first, and matched spans are blanked, so "insufficient brightness" is not also
    # read as a shorter name it contains.
    names = sorted(set(vocab.DISTORTION_NAMES.values()), key=len, reverse=True)
    return [(name, re.compile(r"\b" + re.escape(name) + r"\b", re.IGNORECASE)) for name in names]


def distortion_keywords(text: str) -> set[str]:
    """The distortion names of `octopus_rt.vocab.DISTORTION_NAMES` that `text` mentions."""
    found: set[str] = set()
    remaining = text
    for name, pattern in _keyword_patterns():
        if pattern.search(remaining):
            found.add(name)
            remaining = pattern.sub(" ", remaining)
    return found


def keyword_precision_recall(predicted: set[str], reference: set[str]) -> tuple[float | None, float | None]:
    """Per-answer keyword precision |P & R| / |P| and recall |P & R| / |R|; None where undefined."""
    hits = len(predicted & reference)
    precision = hits / len(predicted) if predicted else None
    recall = hits / len(reference) if reference else None
    return precision, recall

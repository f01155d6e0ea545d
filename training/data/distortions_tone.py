"""Tone, colour and structure distortions: brighten, darken, contrast, saturation, oversharpen,
pixelate, quantization (shared/spec/distortions.md). Same contract as `distortions`: each function
takes a (H, W, 3) float32 RGB image in [0, 1], the severity's parameter and a numpy Generator, and
returns a (H, W, 3) float32 image in [0, 1]. `TABLE` lists (category, subtype, fn, params)."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["TABLE", "median_cut_levels", "multiotsu_thresholds"]

_EPS = 1e-6


def _clip(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def _map_value(image: np.ndarray, fn) -> np.ndarray:
    """Apply `fn` to the V channel of HSV (hue and saturation kept)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # float32: H in [0, 360), S and V in [0, 1]
    hsv[..., 2] = np.clip(fn(hsv[..., 2]), 0.0, 1.0)
    return _clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


# ------------------------------------------------------------------------------ brighten / darken
def shift_hsv(image, shift, rng):
    return _map_value(image, lambda v: v + shift)


def shift_rgb(image, shift, rng):
    return _clip(image + shift)


def gamma_hsv(image, gamma, rng):
    return _map_value(image, lambda v: np.power(np.maximum(v, 0.0), gamma))


def gamma_rgb(image, gamma, rng):
    return _clip(np.power(np.maximum(image, 0.0), gamma))


def _neg(fn):
    return lambda image, shift, rng: fn(image, -shift, rng)


# -------------------------------------------------------------------------------------- contrast
def contrast_scale(image, factor, rng):
    """PIL ImageEnhance.Contrast: blend with the mean grey level (rounded to 8 bits) of the image."""
    luma = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    mean = np.floor(luma.mean() * 255.0 + 0.5) / 255.0
    return _clip(mean + factor * (image - mean))


def contrast_stretch(image, exponent, rng):
    """Sigmoid tone curve 1 / (1 + (mean / x)^f) around the image mean; large f steepens."""
    mean = max(float(image.mean()), _EPS)
    # float64 and a floor of 1e-3 keep (mean / x)^10 finite; the output there is ~0 anyway.
    x = np.maximum(image.astype(np.float64), 1e-3)
    return _clip(1.0 / (1.0 + np.power(mean / x, exponent)))


# ------------------------------------------------------------------------------------ saturation
def saturate_hsv(image, factor, rng):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0.0, 1.0)
    return _clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


def saturate_ycrcb(image, factor, rng):
    ycc = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)  # float32: chroma centred on 0.5
    ycc[..., 1:] = (ycc[..., 1:] - 0.5) * factor + 0.5
    return _clip(cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB))


# ------------------------------------------------------------------------------- sharpen / pixels
def oversharpen(image, amount, rng):
    """Unsharp mask (1 + a) x - a blur(x) with a 5x5 box blur."""
    blurred = cv2.blur(image, (5, 5), borderType=cv2.BORDER_REFLECT_101)
    return _clip((1.0 + amount) * image - amount * blurred)


def pixelate(image, scale, rng):
    """Box (area) downscale by `scale`, then nearest-neighbour upscale back: blocks of ~1/scale px."""
    height, width = image.shape[:2]
    small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


# ---------------------------------------------------------------------------------- quantization
def _levels_u8(channel: np.ndarray) -> np.ndarray:
    return (np.clip(channel, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _class_means(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    sums = np.bincount(labels.ravel(), weights=values.ravel(), minlength=n)
    counts = np.bincount(labels.ravel(), minlength=n)
    return (sums / np.maximum(counts, 1)).astype(np.float32)


def multiotsu_thresholds(values: np.ndarray, classes: int, nbins: int = 30) -> np.ndarray:
    """Multi-level Otsu on a `nbins`-bin histogram of `values` over [min, max]: the (classes - 1)
    thresholds (ascending) that maximise the between-class variance, found exactly by dynamic
    programming over bin boundaries (O(classes * nbins^2); skimage's search takes seconds at 15)."""
    lo, hi = float(values.min()), float(values.max())
    hist, edges = np.histogram(values, bins=nbins, range=(lo, hi if hi > lo else lo + _EPS))
    centres = (edges[:-1] + edges[1:]) / 2.0
    p = hist / hist.sum()
    cw = np.concatenate([[0.0], np.cumsum(p)])
    cs = np.concatenate([[0.0], np.cumsum(p * centres)])
    # score[i, j]: S^2 / W of a class made of bins i..j-1 (maximising the sum of these over the
    # classes is the same as maximising the between-class variance).
    w = cw[None, :] - cw[:, None]
    m = cs[None, :] - cs[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(w > 1e-12, m * m / np.maximum(w, 1e-12), 0.0)
    upper = np.triu(np.ones((nbins + 1, nbins + 1), dtype=bool), k=1)
    score = np.where(upper, score, -np.inf)
    best = score[0].copy()  # best[j]: one class covering bins 0..j-1
    back = []
    for _ in range(classes - 1):
        total = best[:, None] + score  # previous classes end at i, new class covers i..j-1
        back.append(np.argmax(total, axis=0))
        best = total.max(axis=0)
    cuts = []
    j = nbins
    for arg in reversed(back):
        j = int(arg[j])
        cuts.append(j)
    return edges[np.array(sorted(cuts), dtype=int)]


def quantize_otsu(image, classes, rng):
    """Per channel multi-level Otsu (30-bin histogram); each class takes its mean value, so a
    channel ends with at most `classes` levels."""
    out = np.empty_like(image)
    for c in range(3):
        channel = image[..., c]
        thresholds = multiotsu_thresholds(channel, int(classes))
        labels = np.digitize(channel, thresholds)
        out[..., c] = _class_means(channel, labels, int(classes))[labels]
    return out


def median_cut_levels(levels: np.ndarray, colors: int) -> np.ndarray:
    """1-D median cut of uint8 values: split the bucket with the widest value range at its weighted
    median until `colors` buckets; returns a (256,) float32 lookup table to bucket means in [0, 1]."""
    hist = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    present = np.flatnonzero(hist)
    buckets = [(int(present[0]), int(present[-1]))]  # inclusive value ranges
    while len(buckets) < colors:
        splittable = [b for b in buckets if np.count_nonzero(hist[b[0] : b[1] + 1]) > 1]
        if not splittable:
            break
        lo, hi = max(splittable, key=lambda b: b[1] - b[0])
        cum = np.cumsum(hist[lo : hi + 1])
        cut = lo + int(np.searchsorted(cum, cum[-1] / 2.0))
        cut = min(max(cut, lo), hi - 1)  # both halves non-empty in range
        while hist[lo : cut + 1].sum() == 0:
            cut += 1
        buckets.remove((lo, hi))
        right_lo = cut + 1 + int(np.argmax(hist[cut + 1 : hi + 1] > 0))
        buckets += [(lo, cut), (right_lo, hi)]
    table = np.arange(256, dtype=np.float64)
    for lo, hi in buckets:
        weights = hist[lo : hi + 1]
        mean = float((np.arange(lo, hi + 1) * weights).sum() / max(weights.sum(), 1.0))
        table[lo : hi + 1] = mean
    return (table / 255.0).astype(np.float32)


def quantize_median_cut(image, colors, rng):
    out = np.empty_like(image)
    for c in range(3):
        levels = _levels_u8(image[..., c])
        out[..., c] = median_cut_levels(levels, int(colors))[levels]
    return out


def quantize_histogram(image, bins, rng):
    """Uniform quantisation into `bins` equal bins per channel, each mapped to its centre."""
    index = np.minimum(np.floor(image * bins), bins - 1)
    return ((index + 0.5) / bins).astype(np.float32)


_SHIFT_HSV = (0.1, 0.2, 0.3, 0.4, 0.5)
_SHIFT_RGB = (0.1, 0.15, 0.2, 0.27, 0.35)

TABLE = [
    ("brighten", "shift_hsv", shift_hsv, _SHIFT_HSV),
    ("brighten", "shift_rgb", shift_rgb, _SHIFT_RGB),
    ("brighten", "gamma_hsv", gamma_hsv, (0.7, 0.58, 0.47, 0.36, 0.25)),
    ("brighten", "gamma_rgb", gamma_rgb, (0.8, 0.7, 0.6, 0.45, 0.3)),
    ("darken", "shift_hsv", _neg(shift_hsv), _SHIFT_HSV),
    ("darken", "shift_rgb", _neg(shift_rgb), _SHIFT_RGB),
    ("darken", "gamma_hsv", gamma_hsv, (1.5, 1.8, 2.2, 2.7, 3.5)),
    ("darken", "gamma_rgb", gamma_rgb, (1.4, 1.7, 2.1, 2.6, 3.2)),
    ("contrast_strengthen", "scale", contrast_scale, (1.4, 1.7, 2.1, 2.6, 4.0)),
    ("contrast_strengthen", "stretch", contrast_stretch, (2, 4, 6, 8, 10)),
    ("contrast_weaken", "scale", contrast_scale, (0.75, 0.6, 0.45, 0.3, 0.2)),
    ("contrast_weaken", "stretch", contrast_stretch, (1.0, 0.9, 0.8, 0.6, 0.4)),
    ("saturate_strengthen", "hsv", saturate_hsv, (3, 6, 12, 20, 64)),
    ("saturate_strengthen", "ycrcb", saturate_ycrcb, (2, 3, 5, 8, 16)),
    ("saturate_weaken", "hsv", saturate_hsv, (0.7, 0.55, 0.4, 0.2, 0.0)),
    ("saturate_weaken", "ycrcb", saturate_ycrcb, (0.6, 0.4, 0.2, 0.1, 0.0)),
    ("oversharpen", "unsharp", oversharpen, (2, 2.8, 4, 6, 8)),
    ("pixelate", "box", pixelate, (0.5, 0.4, 0.3, 0.25, 0.2)),
    ("quantization", "otsu", quantize_otsu, (15, 11, 8, 5, 3)),
    ("quantization", "median_cut", quantize_median_cut, (20, 15, 10, 6, 3)),
    ("quantization", "histogram", quantize_histogram, (24, 16, 8, 6, 4)),
]

"""Distortion library: every sub-type moves its image statistic the way its name says, monotonically
over severities, and observable parameters show up in the output."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from octopus_rt.training.data import distortions as dist
from octopus_rt.training.data.distortions_tone import median_cut_levels, multiotsu_thresholds


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return cv2.resize(data.astronaut(), (96, 96), interpolation=cv2.INTER_AREA)


def _gray(x):
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32)


def high_freq(x):
    """Mean absolute Laplacian of the grey image: the high-frequency energy."""
    return float(np.abs(cv2.Laplacian(_gray(x), cv2.CV_32F)).mean())


def luminance(x):
    return float(_gray(x).mean())


def contrast(x):
    return float(_gray(x).std())


def saturation(x):
    return float(cv2.cvtColor(x, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32).mean())


def residual(clean):
    return lambda x: float(np.abs(x.astype(np.float32) - clean.astype(np.float32)).mean())


def blockiness(x):
    """Mean gradient across 8x8 block borders over the mean gradient elsewhere (1 = no blocks)."""
    g = _gray(x)
    dh, dv = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
    border = (np.arange(dh.shape[1]) % 8) == 7
    return float((dh[:, border].mean() / dh[:, ~border].mean() + dv[border].mean() / dv[~border].mean()) / 2)


def _series(image, category, subtype, seed=1):
    # The same seed at every severity: differences come from the parameter, not the random draw.
    return [dist.apply_distortion(image, category, subtype, s, np.random.default_rng(seed)) for s in dist.SEVERITIES]


# (category, subtype, metric name, direction, first severity the direction must hold from)
EFFECTS = [
    ("blur", "gaussian", "hf", -1, 1), ("blur", "motion", "hf", -1, 1), ("blur", "glass", "hf", -1, 1),
    ("blur", "lens", "hf", -1, 1), ("blur", "zoom", "hf", -1, 1), ("blur", "jitter", "residual", +1, 1),
    ("noise", "gaussian_rgb", "hf", +1, 1), ("noise", "gaussian_ycrcb", "hf", +1, 1),
    ("noise", "speckle", "hf", +1, 1), ("noise", "spatially_correlated", "hf", +1, 1),
    ("noise", "poisson", "hf", +1, 1), ("noise", "impulse", "hf", +1, 1),
    ("compression", "jpeg", "blockiness", +1, 1), ("compression", "jpeg2000", "residual", +1, 1),
    ("brighten", "shift_hsv", "luminance", +1, 1), ("brighten", "shift_rgb", "luminance", +1, 1),
    ("brighten", "gamma_hsv", "luminance", +1, 1), ("brighten", "gamma_rgb", "luminance", +1, 1),
    ("darken", "shift_hsv", "luminance", -1, 1), ("darken", "shift_rgb", "luminance", -1, 1),
    ("darken", "gamma_hsv", "luminance", -1, 1), ("darken", "gamma_rgb", "luminance", -1, 1),
    ("contrast_strengthen", "scale", "contrast", +1, 1),
    # f = 2 barely steepens the curve (the spec's "hard to see" level 1, never sampled alone).
    ("contrast_strengthen", "stretch", "contrast", +1, 2),
    ("contrast_weaken", "scale", "contrast", -1, 1), ("contrast_weaken", "stretch", "contrast", -1, 1),
    ("saturate_strengthen", "hsv", "saturation", +1, 1), ("saturate_strengthen", "ycrcb", "saturation", +1, 1),
    ("saturate_weaken", "hsv", "saturation", -1, 1), ("saturate_weaken", "ycrcb", "saturation", -1, 1),
    ("oversharpen", "unsharp", "hf", +1, 1), ("pixelate", "box", "hf", -1, 1),
    ("quantization", "otsu", "levels", -1, 1), ("quantization", "median_cut", "levels", -1, 1),
    ("quantization", "histogram", "levels", -1, 1),
]


def test_every_subtype_is_covered():
    listed = {(c, s) for c, s, *_ in EFFECTS}
    registry = {(c, s) for c in dist.REGISTRY for s in dist.REGISTRY[c]}
    assert listed == registry
    assert len(registry) == 35 and len(dist.CATEGORIES) == 12


@pytest.mark.parametrize("category,subtype,metric,direction,start", EFFECTS, ids=[f"{c}-{s}" for c, s, *_ in EFFECTS])
def test_effect_direction_and_monotonic(photo, category, subtype, metric, direction, start):
    metrics = {"hf": high_freq, "luminance": luminance, "contrast": contrast, "saturation": saturation,
               "blockiness": blockiness, "residual": residual(photo),
               "levels": lambda x: max(len(np.unique(x[..., c])) for c in range(3))}
    measure = metrics[metric]
    outs = _series(photo, category, subtype)
    for out in outs:
        assert out.shape == photo.shape and out.dtype == np.uint8
    values = [measure(o) for o in outs]
    clean = measure(photo)
    for v in values[start - 1:]:
        assert (v - clean) * direction > 0, (values, clean)
    steps = np.diff(values) * direction
    assert (steps >= -1e-6).all(), values  # monotonic across severities
    assert (values[-1] - values[0]) * direction > 0


def test_distortions_are_seeded(photo):
    a = dist.apply_distortion(photo, "noise", "gaussian_rgb", 3, np.random.default_rng(7))
    b = dist.apply_distortion(photo, "noise", "gaussian_rgb", 3, np.random.default_rng(7))
    c = dist.apply_distortion(photo, "noise", "gaussian_rgb", 3, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_rejects_non_rgb_uint8(photo):
    with pytest.raises(ValueError):
        dist.apply_distortion(photo.astype(np.float32), "blur", "gaussian", 1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        dist.parameter("blur", "gaussian", 6)


def test_small_and_non_square_images_work():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 47, 3), dtype=np.uint8)
    for category in dist.REGISTRY:
        for subtype in dist.REGISTRY[category]:
            out = dist.apply_distortion(image, category, subtype, 5, np.random.default_rng(0))
            assert out.shape == image.shape


# ------------------------------------------------------------------------ observable parameters
def test_impulse_pixel_fraction():
    flat = np.full((200, 200, 3), 128, dtype=np.uint8)
    for severity, amount in zip(dist.SEVERITIES, dist.REGISTRY["noise"]["impulse"].params):
        out = dist.apply_distortion(flat, "noise", "impulse", severity, np.random.default_rng(severity))
        hit = (out != 128).any(axis=2)
        assert abs(hit.mean() - amount) < 0.01
        # salt and pepper only: every hit pixel is pure black or pure white in all channels
        values = out[hit]
        assert np.isin(values, [0, 255]).all() and (values == values[:, :1]).all()


def test_pixelate_block_size(photo):
    height, width = photo.shape[:2]
    for severity, scale in zip(dist.SEVERITIES, dist.REGISTRY["pixelate"]["box"].params):
        out = dist.apply_distortion(photo, "pixelate", "box", severity, np.random.default_rng(0))
        distinct_rows = 1 + int((np.abs(np.diff(out.astype(int), axis=0)).sum(axis=(1, 2)) > 0).sum())
        distinct_cols = 1 + int((np.abs(np.diff(out.astype(int), axis=1)).sum(axis=(0, 2)) > 0).sum())
        assert distinct_rows <= round(height * scale) and distinct_cols <= round(width * scale)
        assert distinct_rows >= round(height * scale) - 2  # blocks of ~1/scale pixels, not larger


@pytest.mark.parametrize("subtype", ["otsu", "median_cut", "histogram"])
def test_quantization_level_count(photo, subtype):
    for severity, levels in zip(dist.SEVERITIES, dist.REGISTRY["quantization"][subtype].params):
        out = dist.apply_distortion(photo, "quantization", subtype, severity, np.random.default_rng(0))
        for c in range(3):
            assert len(np.unique(out[..., c])) <= levels


def test_multiotsu_matches_exhaustive_search():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0.2, 0.05, 500), rng.normal(0.5, 0.05, 300), rng.normal(0.8, 0.05, 200)])
    values = np.clip(values, 0, 1)
    thresholds = multiotsu_thresholds(values, 3, nbins=30)

    def between_var(ts):
        labels = np.digitize(values, ts)
        return sum((labels == k).mean() * values[labels == k].mean() ** 2 for k in range(3) if (labels == k).any())

    hist_edges = np.histogram_bin_edges(values, bins=30, range=(values.min(), values.max()))
    best = max(((a, b) for i, a in enumerate(hist_edges[1:-1]) for b in hist_edges[i + 2:-1]), key=between_var)
    assert between_var(thresholds) == pytest.approx(between_var(best))


def test_median_cut_bucket_count():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=5000).astype(np.uint8)
    for colors in (3, 6, 20):
        table = median_cut_levels(levels, colors)
        assert len(np.unique(table[levels])) == colors


def _ijg_dc(quality: int) -> int:
    """libjpeg's scaling of the standard luminance DC quantiser (16) for a quality setting."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return min(max((16 * scale + 50) // 100, 1), 255)


def test_jpeg_quality_in_quantisation_table(photo):
    for quality in dist.REGISTRY["compression"]["jpeg"].params:
        table = Image.open(io.BytesIO(dist.encode_jpeg(photo, quality))).quantization[0]
        assert table[0] == _ijg_dc(quality)


def test_jpeg2000_reaches_psnr_target(photo):
    for severity, target in zip(dist.SEVERITIES, dist.REGISTRY["compression"]["jpeg2000"].params):
        out = dist.apply_distortion(photo, "compression", "jpeg2000", severity, np.random.default_rng(0))
        mse = ((out.astype(np.float64) - photo) ** 2).mean()
        assert 10 * np.log10(255**2 / mse) == pytest.approx(target, abs=1.5)


def test_jitter_moves_pixels_at_most_its_shift():
    rng = np.random.default_rng(0)
    # unique colour per pixel so the source of every output pixel can be found
    h = w = 40
    index = np.arange(h * w).reshape(h, w)
    image = np.stack([index % 256, index // 256, np.zeros_like(index)], axis=-1).astype(np.uint8)
    for severity, shift in zip(dist.SEVERITIES, dist.REGISTRY["blur"]["jitter"].params):
        out = dist.apply_distortion(image, "blur", "jitter", severity, rng).astype(int)
        src = out[..., 0] + 256 * out[..., 1]
        ys, xs = np.divmod(src, w)
        yy, xx = np.mgrid[0:h, 0:w]
        assert np.abs(ys - yy).max() <= shift and np.abs(xs - xx).max() <= shift
        assert np.abs(xs - xx).max() == shift  # the full range is used


def test_saturation_zero_makes_grey(photo):
    for subtype in ("hsv", "ycrcb"):
        out = dist.apply_distortion(photo, "saturate_weaken", subtype, 5, np.random.default_rng(0)).astype(int)
        assert np.abs(out - out[..., :1]).max() <= 2

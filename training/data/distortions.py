"""The distortion library: 12 categories, 35 sub-types, 5 severities (shared/spec/distortions.md).

Every sub-type is a function ``f(image, param, rng) -> image`` on a (H, W, 3) float32 RGB image with
values in [0, 1]; `apply_distortion` wraps them for (H, W, 3) uint8 RGB input and output and looks up
the severity's parameter. This module holds the registry and the blur, noise and compression
families; the tone / colour / structure families live in `distortions_tone`.

Randomness comes only from the ``rng`` (numpy Generator) argument, so a seeded run is reproducible.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "SubType",
    "REGISTRY",
    "CATEGORIES",
    "SEVERITIES",
    "apply_distortion",
    "subtypes",
    "parameter",
]

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

DistortFn = Callable[[np.ndarray, object, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class SubType:
    """One sub-type: its function and its parameter per severity (index s - 1)."""

    category: str
    name: str
    fn: DistortFn
    params: tuple


def _clip(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0.0, 1.0, out=image).astype(np.float32, copy=False)


def _filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # Reflect at the border so a blurred region next to the frame has no dark rim.
    return cv2.filter2D(image, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def _random_remap(image: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Move every pixel's sample point by an integer offset uniform in [-max_shift, max_shift]."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    dx = rng.integers(-max_shift, max_shift + 1, size=(height, width))
    dy = rng.integers(-max_shift, max_shift + 1, size=(height, width))
    src_x = np.clip(xx + dx, 0, width - 1)
    src_y = np.clip(yy + dy, 0, height - 1)
    return image[src_y, src_x]


# ----------------------------------------------------------------------------------------- blur
def blur_gaussian(image, sigma, rng):
    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT_101)


def motion_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """(2r+1, 2r+1) float32 line kernel through the centre at `angle_deg` (0 = horizontal), weighted
    by a Gaussian of the distance along the line; sums to 1."""
    size = 2 * radius + 1
    kernel = np.zeros((size, size), dtype=np.float32)
    theta = np.deg2rad(angle_deg)
    t = np.linspace(-radius, radius, 4 * size)
    xs = np.rint(radius + t * np.cos(theta)).astype(int)
    ys = np.rint(radius - t * np.sin(theta)).astype(int)
    weights = np.exp(-0.5 * (t / sigma) ** 2).astype(np.float32)
    np.maximum.at(kernel, (ys, xs), weights)
    return kernel / kernel.sum()


def blur_motion(image, param, rng):
    radius, sigma = param
    angle = float(rng.uniform(-90.0, 90.0))
    return _filter(image, motion_kernel(int(radius), float(sigma), angle))


def blur_glass(image, param, rng):
    """Gaussian blur, then `iterations` rounds of local random pixel displacement, then blur again."""
    sigma, max_shift, iterations = param
    out = blur_gaussian(image, sigma, rng)
    for _ in range(int(iterations)):
        out = _random_remap(out, int(max_shift), rng)
    return blur_gaussian(out, sigma, rng)


def disk_kernel(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) float32 uniform disk (defocus) kernel, sums to 1."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    kernel = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    return kernel / kernel.sum()


def blur_lens(image, radius, rng):
    return _filter(image, disk_kernel(int(radius)))


def blur_zoom(image, max_zoom, rng):
    """Average of centre zooms by factors 1, 1.02, ... < max_zoom (+ max_zoom itself)."""
    height, width = image.shape[:2]
    factors = list(np.arange(1.0, max_zoom, 0.02)) + [max_zoom]
    acc = np.zeros_like(image, dtype=np.float32)
    for z in factors:
        zh, zw = int(np.ceil(height * z)), int(np.ceil(width * z))
        zoomed = cv2.resize(image, (zw, zh), interpolation=cv2.INTER_LINEAR)
        top, left = (zh - height) // 2, (zw - width) // 2
        acc += zoomed[top : top + height, left : left + width]
    return acc / len(factors)


def blur_jitter(image, max_shift, rng):
    return _random_remap(image, int(max_shift), rng)


# ---------------------------------------------------------------------------------------- noise
def noise_gaussian_rgb(image, sigma, rng):
    return _clip(image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32))


def noise_gaussian_ycrcb(image, param, rng):
    sigma_y, chroma_ratio = param
    ycc = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
    sigmas = np.array([sigma_y, sigma_y * chroma_ratio, sigma_y * chroma_ratio], dtype=np.float32)
    ycc = ycc + rng.normal(0.0, 1.0, size=image.shape).astype(np.float32) * sigmas
    return _clip(cv2.cvtColor(ycc.astype(np.float32), cv2.COLOR_YCrCb2RGB))


def noise_speckle(image, scale, rng):
    return _clip(image + image * rng.normal(0.0, scale, size=image.shape).astype(np.float32))


def noise_spatially_correlated(image, sigma, rng):
    """White Gaussian noise smoothed by a 3x3 box filter (so neighbouring pixels share it), added."""
    noise = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    noise = cv2.blur(noise, (3, 3), borderType=cv2.BORDER_REFLECT_101)
    return _clip(image + noise)


def noise_poisson(image, photons, rng):
    """Shot noise: each value becomes Poisson(value * photons) / photons (fewer photons, more noise)."""
    return _clip((rng.poisson(image * float(photons)) / float(photons)).astype(np.float32))


def noise_impulse(image, amount, rng):
    """Salt and pepper: a fraction `amount` of the pixels (all channels) set to black or white, half each."""
    height, width = image.shape[:2]
    hit = rng.random((height, width)) < amount
    salt = rng.random((height, width)) < 0.5
    out = image.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


# ---------------------------------------------------------------------------------- compression
def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_jpeg(image_u8: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG bytes (Pillow / libjpeg, standard tables scaled by `quality`, 4:2:0 chroma)."""
    buffer = io.BytesIO()
    Image.fromarray(image_u8, mode="RGB").save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def compression_jpeg(image, quality, rng):
    data = encode_jpeg(_to_uint8(image), quality)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def compression_jpeg2000(image, psnr_db, rng):
    """OpenJPEG with one quality layer targeting `psnr_db` dB (Pillow's quality_mode="dB")."""
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(image), mode="RGB").save(
        buffer, format="JPEG2000", quality_mode="dB", quality_layers=[float(psnr_db)], irreversible=True
    )
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0


# -------------------------------------------------------------------------------------- registry
def _build_registry() -> dict[str, dict[str, SubType]]:
    from octopus_rt.training.data import distortions_tone as tone

    table: list[tuple[str, str, DistortFn, tuple]] = [
        ("blur", "gaussian", blur_gaussian, (1, 2, 3, 4, 5)),
        ("blur", "motion", blur_motion, ((5, 3), (10, 5), (15, 7), (15, 9), (20, 12))),
        ("blur", "glass", blur_glass, ((0.7, 1, 1), (0.9, 2, 1), (1.2, 2, 2), (1.4, 3, 2), (1.6, 4, 2))),
        ("blur", "lens", blur_lens, (2, 3, 4, 6, 8)),
        ("blur", "zoom", blur_zoom, (1.03, 1.06, 1.10, 1.15, 1.21)),
        ("blur", "jitter", blur_jitter, (1, 2, 3, 4, 5)),
        ("noise", "gaussian_rgb", noise_gaussian_rgb, (0.05, 0.10, 0.15, 0.20, 0.25)),
        ("noise", "gaussian_ycrcb", noise_gaussian_ycrcb,
         ((0.05, 1.0), (0.06, 1.45), (0.07, 1.9), (0.08, 2.35), (0.09, 2.8))),
        ("noise", "speckle", noise_speckle, (0.14, 0.21, 0.28, 0.35, 0.42)),
        ("noise", "spatially_correlated", noise_spatially_correlated, (0.08, 0.11, 0.14, 0.18, 0.22)),
        ("noise", "poisson", noise_poisson, (80, 60, 40, 25, 15)),
        ("noise", "impulse", noise_impulse, (0.01, 0.03, 0.05, 0.07, 0.10)),
        ("compression", "jpeg", compression_jpeg, (25, 18, 12, 8, 5)),
        ("compression", "jpeg2000", compression_jpeg2000, (29.0, 27.5, 26.0, 24.5, 23.0)),
    ] + tone.TABLE
    registry: dict[str, dict[str, SubType]] = {}
    for category, name, fn, params in table:
        if len(params) != len(SEVERITIES):
            raise AssertionError(f"{category}/{name}: expected 5 parameters")
        registry.setdefault(category, {})[name] = SubType(category, name, fn, tuple(params))
    return registry


REGISTRY: dict[str, dict[str, SubType]] = _build_registry()
CATEGORIES: tuple[str, ...] = tuple(REGISTRY)


def subtypes(category: str) -> tuple[str, ...]:
    """Sub-type names of one category."""
    return tuple(REGISTRY[category])


def parameter(category: str, subtype: str, severity: int):
    """The spec's parameter of (category, subtype) at severity 1..5."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1..5, got {severity}")
    return REGISTRY[category][subtype].params[severity - 1]


def apply_distortion(
    image: np.ndarray, category: str, subtype: str, severity: int, rng: np.random.Generator
) -> np.ndarray:
    """Distort a whole (H, W, 3) uint8 RGB image; returns a new (H, W, 3) uint8 RGB image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    entry = REGISTRY[category][subtype]
    out = entry.fn(image.astype(np.float32) / 255.0, parameter(category, subtype, severity), rng)
    return _to_uint8(out)

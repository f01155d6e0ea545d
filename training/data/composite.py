"""Region-wise application of distortions and the paper's table-8 accumulation orders.

A distortion is applied to the whole image, then composited back through the region mask with a
narrow feather: alpha is the mask box-filtered with a (2f+1) x (2f+1) window (f = `feather` pixels),
so alpha is exactly 1 more than f pixels (Chebyshev distance) inside the region, exactly 0 more than
f pixels outside, and ramps linearly across the 2f-pixel band on the boundary. A hard cut would be
an artificial edge of its own (a visible seam in a blurred region); the narrow ramp avoids that and
still keeps the change within f pixels of the mask. Default f = 2 px.
"""

from __future__ import annotations

import cv2
import numpy as np

from octopus_rt.training.data.distortions import apply_distortion

__all__ = [
    "DEFAULT_FEATHER",
    "ALLOWED_ORDERS",
    "ORDERED_PAIRS",
    "feather_alpha",
    "composite",
    "apply_chain",
    "order_allowed",
]

DEFAULT_FEATHER = 2

# Paper table 8 (shared/spec/distortions.md): first category -> categories allowed second.
ALLOWED_ORDERS: dict[str, tuple[str, ...]] = {
    "blur": ("compression", "noise"),
    "compression": ("blur", "noise"),
    "contrast_weaken": ("noise", "blur", "compression", "contrast_weaken", "pixelate", "saturate_weaken"),
    "pixelate": ("noise",),
    "saturate_weaken": ("noise",),
}
ORDERED_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (first, second) for first, seconds in ALLOWED_ORDERS.items() for second in seconds
)


def order_allowed(categories: list[str] | tuple[str, ...]) -> bool:
    """True for one category, or for a (first, second) pair listed in table 8."""
    if len(categories) == 1:
        return True
    return len(categories) == 2 and tuple(categories) in ORDERED_PAIRS


def feather_alpha(mask: np.ndarray, feather: int = DEFAULT_FEATHER) -> np.ndarray:
    """(H, W) float32 blend weight in [0, 1] from a (H, W) bool mask (see the module docstring)."""
    alpha = mask.astype(np.float32)
    if feather <= 0:
        return alpha
    size = 2 * feather + 1
    # BORDER_REPLICATE: a region touching the frame stays fully distorted up to the frame.
    return cv2.blur(alpha, (size, size), borderType=cv2.BORDER_REPLICATE)


def composite(clean: np.ndarray, distorted: np.ndarray, mask: np.ndarray, feather: int = DEFAULT_FEATHER) -> np.ndarray:
    """Blend two (H, W, 3) uint8 images: `distorted` inside the mask, `clean` outside, feathered."""
    if mask.all():
        return distorted.copy()
    alpha = feather_alpha(mask, feather)[..., None]
    out = clean.astype(np.float32) * (1.0 - alpha) + distorted.astype(np.float32) * alpha
    return (out + 0.5).astype(np.uint8)


def apply_chain(
    image: np.ndarray,
    mask: np.ndarray,
    chain: list[dict],
    rng: np.random.Generator,
    feather: int = DEFAULT_FEATHER,
) -> np.ndarray:
    """Apply an ordered chain of {"category", "subtype", "severity"} dicts inside `mask`; each step
    distorts the result of the previous one (accumulation). Two-step chains must follow table 8."""
    if not order_allowed([step["category"] for step in chain]):
        raise ValueError(f"accumulation order not in table 8: {[step['category'] for step in chain]}")
    out = image
    for step in chain:
        distorted = apply_distortion(out, step["category"], step["subtype"], int(step["severity"]), rng)
        out = composite(out, distorted, mask, feather)
    return out

"""Region-wise compositing stays within the mask plus the feather; table-8 orders are enforced."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from octopus_rt.training.data import composite as comp


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return cv2.resize(data.coffee(), (96, 64), interpolation=cv2.INTER_AREA)


def _blob_mask(shape):
    mask = np.zeros(shape, dtype=bool)
    cv2.circle(mask.view(np.uint8), (40, 30), 18, 1, -1)
    return mask


def _chebyshev_distance(mask):
    """Distance in pixels (max norm) of each pixel to the mask."""
    out = np.full(mask.shape, np.inf)
    for d in range(0, 10):
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * d + 1, 2 * d + 1), np.uint8)).astype(bool)
        out[grown & np.isinf(out)] = d
    return out


@pytest.mark.parametrize("feather", [0, 2, 4])
def test_composite_confined_to_mask_plus_feather(photo, feather):
    mask = _blob_mask(photo.shape[:2])
    noisy = np.full_like(photo, 255)  # a change everywhere, so any leak is visible
    out = comp.composite(photo, noisy, mask, feather)
    changed = (out != photo).any(axis=2)
    distance_out = _chebyshev_distance(mask)
    distance_in = _chebyshev_distance(~mask)
    assert not changed[distance_out > feather].any()  # nothing beyond the feather outside
    # fully distorted more than `feather` pixels inside the region
    deep_inside = distance_in > feather
    assert (out[deep_inside] == 255).all()
    if feather:
        # the ramp: some pixels in the band are partial blends
        band = (distance_out <= feather) & (distance_in <= feather)
        partial = (out[band] != 255).any(axis=1) & (out[band] != photo[band]).any(axis=1)
        assert partial.any()


def test_feather_alpha_range(photo):
    mask = _blob_mask(photo.shape[:2])
    alpha = comp.feather_alpha(mask, 2)
    assert alpha.min() == 0.0 and alpha.max() == 1.0
    assert ((alpha > 0) & (alpha < 1)).sum() > 0


def test_whole_image_mask_is_plain_distortion(photo):
    full = np.ones(photo.shape[:2], dtype=bool)
    distorted = 255 - photo
    assert np.array_equal(comp.composite(photo, distorted, full, 2), distorted)


def test_table8_orders():
    assert len(comp.ORDERED_PAIRS) == 2 + 2 + 6 + 1 + 1
    assert comp.order_allowed(["blur", "noise"]) and not comp.order_allowed(["noise", "blur"])
    assert comp.order_allowed(["contrast_weaken", "contrast_weaken"])
    assert not comp.order_allowed(["pixelate", "blur"])
    assert not comp.order_allowed(["blur", "noise", "compression"])
    for first, second in comp.ORDERED_PAIRS:
        assert second in comp.ALLOWED_ORDERS[first]


def test_apply_chain_rejects_order_outside_table8(photo):
    mask = _blob_mask(photo.shape[:2])
    chain = [{"category": "noise", "subtype": "gaussian_rgb", "severity": 2},
             {"category": "blur", "subtype": "gaussian", "severity": 2}]
    with pytest.raises(ValueError):
        comp.apply_chain(photo, mask, chain, np.random.default_rng(0))


def test_apply_chain_accumulates_in_order(photo):
    mask = np.ones(photo.shape[:2], dtype=bool)
    blur = {"category": "blur", "subtype": "gaussian", "severity": 3}
    noise = {"category": "noise", "subtype": "gaussian_rgb", "severity": 3}
    blur_then_noise = comp.apply_chain(photo, mask, [blur, noise], np.random.default_rng(0))
    only_blur = comp.apply_chain(photo, mask, [blur], np.random.default_rng(0))

    def hf(x):
        return np.abs(cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32), cv2.CV_32F)).mean()

    # noise applied last survives: the result is noisier than the blurred image and the photo
    assert hf(blur_then_noise) > hf(only_blur) and hf(blur_then_noise) > hf(photo)

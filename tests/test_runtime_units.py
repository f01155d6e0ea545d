"""Small torch-free units of the runtime: mention detection, axis probabilities, device choice,
the image cache, the overlay."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from octopus_rt.errors import OctopusError
from octopus_rt.runtime import closed_set
from octopus_rt.runtime.backends import resolve_device
from octopus_rt.runtime.cache import ImageCache, ImageEntry
from octopus_rt.runtime.overlay import mask_to_png, render_overlay

CLOSED = {"left": [10, 11], "right": [12], "top": [20], "bottom": [21, 22], "good": [30]}


def test_first_mention_per_axis_counts():
    axis_ids = closed_set.axis_token_ids(CLOSED)
    assert axis_ids == {10: "horizontal", 11: "horizontal", 12: "horizontal", 20: "vertical", 21: "vertical", 22: "vertical"}
    tokens = [5, 22, 7, 11, 12, 20, 10]
    assert closed_set.first_mentions(tokens, axis_ids) == {"vertical": 1, "horizontal": 3}
    assert closed_set.first_mentions([1, 2, 30], axis_ids) == {}


def test_axis_probabilities_and_missing_axis_centre():
    rng = np.random.default_rng(0)
    horizontal, vertical = rng.normal(size=40), rng.normal(size=40)
    probs = closed_set.position_probs({"horizontal": horizontal, "vertical": vertical}, CLOSED, tau=2.0)
    # Independently: a word's score is the logsumexp of its forms' logits, then softmax(score / tau).
    expected_h = softmax([logsumexp(horizontal[CLOSED["left"]]), logsumexp(horizontal[CLOSED["right"]])] / np.float64(2.0))
    expected_v = softmax([logsumexp(vertical[CLOSED["top"]]), logsumexp(vertical[CLOSED["bottom"]])] / np.float64(2.0))
    assert probs == pytest.approx({"left": expected_h[0], "right": expected_h[1], "top": expected_v[0], "bottom": expected_v[1]})
    point = closed_set.point_from_position_probs(probs, 200, 100, "paper")
    assert point == pytest.approx((probs["right"] * 200, probs["bottom"] * 100))
    # Only the vertical axis mentioned: x is the centre.
    only_v = closed_set.position_probs({"vertical": vertical}, CLOSED)
    assert set(only_v) == {"top", "bottom"}
    x, y = closed_set.point_from_position_probs(only_v, 200, 100, "quadrant")
    assert x == 100.0 and y == pytest.approx((0.25 + 0.5 * only_v["bottom"]) * 100)
    assert closed_set.point_from_position_probs({}, 200, 100) is None


def test_device_resolution():
    cpu = ("CPUExecutionProvider",)
    gpu = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert resolve_device("auto", cpu).name == "cpu"
    auto = resolve_device("auto", gpu, probe=lambda device: None)
    assert auto.name == "cuda" and auto.device_type == "cuda"  # TensorRT stays opt-in
    assert resolve_device("tensorrt", gpu).providers[0] == "TensorrtExecutionProvider"
    # Listed is not usable: onnxruntime-gpu lists CUDA without a GPU; auto asks the probe.
    refused = resolve_device("auto", gpu, probe=lambda device: "libcuda.so.1: cannot open shared object file")
    assert refused.name == "cpu" and refused.providers == ("CPUExecutionProvider",) and "libcuda.so.1" in refused.reason
    with pytest.raises(OctopusError, match="CUDAExecutionProvider.*octopus-rt\\[gpu\\]"):
        resolve_device("cuda", cpu)
    with pytest.raises(OctopusError, match="unknown device"):
        resolve_device("npu", cpu)


def test_image_cache_is_lru_and_bounded():
    cache = ImageCache(2)
    for key in "abc":
        cache.put(key, ImageEntry(size=(1, 1)))
    assert cache.keys() == ["b", "c"]
    cache.get("b")
    cache.put("d", ImageEntry(size=(1, 1)))
    assert cache.keys() == ["b", "d"]
    off = ImageCache(0)
    off.put("a", ImageEntry(size=(1, 1)))
    assert len(off) == 0


def test_overlay_tints_the_mask_and_adds_a_caption():
    rgb = np.full((40, 50, 3), 100, dtype=np.uint8)
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:15, 5:20] = True
    image = render_overlay(rgb, mask, (40.0, 30.0), "The top left region is the most degraded.")
    scale = image.width // 50
    assert image.width == 50 * scale and image.height > 40 * scale
    pixels = np.asarray(image)
    inside, outside = pixels[10 * scale, 10 * scale], pixels[35 * scale, 5 * scale]
    assert inside[0] > outside[0] and inside[1] < outside[1]
    assert set(np.unique(np.asarray(mask_to_png(mask)))) == {0, 255}

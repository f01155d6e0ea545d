"""Region proposals: a tiling of large, thick regions; SAM masks post-processed the same way."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from octopus_rt.training.data.regions import RegionOptions, colour_name, describe_region, propose_regions


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return cv2.resize(data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)


def _check_tiling(masks, shape, options):
    coverage = np.sum(masks, axis=0)
    assert coverage.shape == shape and (coverage == 1).all()
    for mask in masks:
        assert mask.mean() >= options.min_area * 0.5  # dropped pieces only ever grow kept regions


def test_classical_regions_tile_and_are_large(photo):
    options = RegionOptions()
    masks = propose_regions(photo, np.random.default_rng(0), options)
    assert 2 <= len(masks) <= options.max_kept
    _check_tiling(masks, photo.shape[:2], options)
    areas = [m.sum() for m in masks]
    assert areas == sorted(areas, reverse=True)


def test_classical_regions_deterministic(photo):
    a = propose_regions(photo, np.random.default_rng(5))
    b = propose_regions(photo, np.random.default_rng(5))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_flat_image_is_one_region():
    flat = np.full((64, 64, 3), 90, np.uint8)
    masks = propose_regions(flat, np.random.default_rng(0))
    assert len(masks) >= 1
    _check_tiling(masks, (64, 64), RegionOptions())


class _FakeSam:
    """Stands in for SamAutomaticMaskGenerator: returns fixed masks in its output format."""

    def __init__(self, masks):
        self.masks = masks

    def generate(self, image):
        return [{"segmentation": m[: image.shape[0], : image.shape[1]], "area": int(m.sum())} for m in self.masks]


def test_sam_masks_are_deduplicated_and_cleaned():
    h = w = 64
    big = np.zeros((h, w), bool)
    big[:, :40] = True
    overlapping = np.zeros((h, w), bool)
    overlapping[10:50, 30:64] = True
    thin = np.zeros((h, w), bool)
    thin[:, 62:] = True  # 2 px wide: dropped as too thin
    image = np.zeros((h, w, 3), np.uint8)
    masks = propose_regions(image, np.random.default_rng(0), sam_generator=_FakeSam([thin, overlapping, big]))
    _check_tiling(masks, (h, w), RegionOptions())
    assert np.array_equal(masks[0], big)  # the largest claims its pixels first
    # big, the rest of `overlapping`, and the unclaimed remainder's two pieces (above and below it);
    # the 2-pixel strip is too thin to stand alone and went to its neighbours
    assert len(masks) == 4
    for mask in masks:
        cols = np.flatnonzero(mask.any(axis=0))
        assert cols[-1] - cols[0] + 1 > 2


def test_describe_region_attributes():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (20, 40, 200)
    image[:, 32:] = (250, 250, 250)
    left = np.zeros((64, 64), bool)
    left[:, :32] = True
    assert describe_region(image, left) == "large dark blue area" or "blue" in describe_region(image, left)
    assert "white" in describe_region(image, ~left)
    assert colour_name(np.array([200, 30, 30])) == "red" and colour_name(np.array([30, 160, 40])) == "green"
    assert colour_name(np.array([128, 128, 128])) == "gray" and colour_name(np.array([5, 5, 5])) == "black"


@pytest.mark.slow
def test_real_sam_checkpoint(tmp_path):
    """Random-weight vit_b SAM checkpoint: the loader reads it and synth runs through it."""
    import torch
    from PIL import Image
    from segment_anything import sam_model_registry

    from octopus_rt.training.data.synth import SynthOptions, synthesize

    checkpoint = tmp_path / "sam_test.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), checkpoint)
    (tmp_path / "src").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "src" / "a.png")
    report = synthesize(tmp_path / "src", tmp_path / "out",
                        SynthOptions(num=1, size=64, sam=str(checkpoint), workers=1, progress=False))
    assert report.samples == 1 and sum(report.records.values()) >= 1

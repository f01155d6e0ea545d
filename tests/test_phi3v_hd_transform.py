"""runtime.hd_transform (numpy + Pillow) against Microsoft's two other implementations and the facts.

Oracles, each independent of our code:
- onnxruntime-extensions' `Phi3ImageTransform` (Microsoft's C++ port, used by onnxruntime-genai) at
  its fixed 16 crops. Known differences (docs/phi3v.md): it resizes portraits without transposing
  (Pillow's two passes then run in the other order: +-1 grey level on some pixels), and its global
  view is an antialiased Pillow-style bicubic where the official code uses torch bicubic without
  antialias (differences up to ~1.3 in normalised units). Sizes, token counts, landscape/square crops
  and the zero padding must be identical; portrait crops within 1 grey level; the global view only
  loosely (it is a different resampling of the same picture).
- the official path re-done here with the calls processing_phi3_v.py makes (torchvision resize / pad /
  ToTensor / Normalize, torch interpolate), at num_crops 4 and 16: crops bit-identical, global view
  within float32 rounding of torch's kernel.
- published figures: transformers.js' Phi3V tests (a 1280 x 640 image at 4 crops -> 336 x 672, 457
  tokens; a white square -> 672 x 672, 757 tokens, every crop's mean 2.0504).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from octopus_rt.runtime.hd_transform import CLIP_MEAN, CLIP_STD, HDTransform, bicubic_resize, hd_image_size, num_image_tokens

# (width, height): landscape, portrait, square, tiny, extreme both ways, odd sizes.
SIZES = [(640, 480), (480, 640), (512, 512), (20, 30), (100, 1000), (1000, 100), (333, 517), (517, 333), (1001, 999)]
# One grey level in normalised units for the channel with the smallest std.
ONE_LEVEL = 1.0 / (255.0 * min(CLIP_STD))


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth content plus noise: resampling differences show, as on photographs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [128 + 100 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in range(3)]
    image = np.stack(planes, axis=-1) + rng.normal(0, 20, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ortx_processor(tmp_path_factory):
    pp_api = pytest.importorskip("onnxruntime_extensions.pp_api")
    config = {"processor": {"name": "image_processing", "transforms": [
        # DecodeImage yields BGR; ConvertRGB swaps the channels back (onnxruntime-genai's phi-3-vision JSON).
        {"operation": {"name": "decode_image", "type": "DecodeImage", "attrs": {"color_space": "BGR"}}},
        {"operation": {"name": "convert_to_rgb", "type": "ConvertRGB"}},
        {"operation": {"name": "phi3_image_transform", "type": "Phi3ImageTransform"}},
    ]}}
    path = tmp_path_factory.mktemp("ortx") / "phi3_image.json"
    path.write_text(json.dumps(config))
    return pp_api, pp_api.ImageProcessor(str(path))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_matches_onnxruntime_extensions(size, ortx_processor, tmp_path):
    pp_api, processor = ortx_processor
    width, height = size
    image = _photo(width, height, seed=width * 7 + height)
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    result = processor.pre_process([str(path)])
    pixel_values, image_sizes, tokens = (pp_api.tensor_result_get_at(result, i) for i in range(3))
    ours = HDTransform(num_crops=16)(image)

    assert tuple(int(v) for v in image_sizes[0]) == ours.image_size
    assert int(tokens.reshape(-1)[0]) == ours.num_img_tokens
    assert pixel_values.shape[1:] == ours.pixel_values.shape
    theirs_crops, our_crops = pixel_values[0, 1:], ours.pixel_values[1:]
    np.testing.assert_array_equal(our_crops[ours.num_used_crops - 1 :], 0.0)  # zero padding
    np.testing.assert_array_equal(theirs_crops[ours.num_used_crops - 1 :], 0.0)
    if width >= height:
        np.testing.assert_array_equal(our_crops, theirs_crops)
    else:
        difference = np.abs(our_crops - theirs_crops)
        assert difference.max() <= ONE_LEVEL * 1.001
        assert (difference > ONE_LEVEL / 2).mean() < 0.3
    global_gap = np.abs(pixel_values[0, 0] - ours.pixel_values[0])
    assert global_gap.mean() < 0.2 and global_gap.max() < 2.0


def _official_reference(image: Image.Image, num_crops: int):
    """processing_phi3_v.py's preprocess with the same torchvision / torch calls: the PyTorch reference's
    own implementation (export/phi3v_reference.py), which the parity tests and the export verification use."""
    from octopus_rt.export.phi3v_reference import official_pixel_values

    pixels, size = official_pixel_values(image, num_crops)
    return pixels.numpy(), size


@pytest.mark.parametrize("num_crops", [4, 16])
def test_matches_the_official_torchvision_path(num_crops):
    pytest.importorskip("torchvision")
    for width, height in [(640, 480), (480, 640), (20, 30), (333, 517), (1000, 100)]:
        image = _photo(width, height, seed=num_crops + width)
        reference, size = _official_reference(Image.fromarray(image), num_crops)
        ours = HDTransform(num_crops=num_crops)(image)
        assert ours.image_size == size
        assert ours.pixel_values.shape == reference.shape
        np.testing.assert_array_equal(ours.pixel_values[1:], reference[1:])
        # torch's kernel may fuse multiply-adds; measured gap <= 5e-7 on values of magnitude ~2.
        np.testing.assert_allclose(ours.pixel_values[0], reference[0], rtol=0, atol=2e-6)


def test_bicubic_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    # HD images are multiples of 336 (integer scales: measured gap <= 5e-7); other sizes resample at
    # non-integer scales, where torch's fused multiply-adds leave a few 1e-6 (measured <= 7e-6).
    cases = [((3, 1344, 1008), 2e-6), ((3, 336, 3360), 2e-6), ((3, 672, 672), 2e-6), ((3, 336, 336), 0.0),
             ((2, 700, 339), 1e-5), ((1, 40, 50), 1e-5)]
    for shape, tolerance in cases:
        image = rng.normal(0, 1.5, shape).astype(np.float32)
        reference = torch.nn.functional.interpolate(
            torch.from_numpy(image)[None], size=(336, 336), mode="bicubic", align_corners=False
        )[0].numpy()
        np.testing.assert_allclose(bicubic_resize(image, 336, 336), reference, rtol=0, atol=tolerance)


def test_published_transformers_js_figures():
    # 1280 x 640 at 4 crops: image_sizes (336, 672), 457 tokens.
    wide = HDTransform(num_crops=4)(np.zeros((640, 1280, 3), dtype=np.uint8))
    assert wide.image_size == (336, 672) and wide.num_img_tokens == 457 and wide.crop_grid == (1, 2)
    # A white square at 4 crops: 672 x 672, 757 tokens, each of the 5 crops with mean 2.0504 (white
    # is constant, so the bicubic global view is too).
    white = HDTransform(num_crops=4)(Image.new("RGB", (640, 640), "white"))
    assert white.image_size == (672, 672) and white.num_img_tokens == 757
    assert white.pixel_values.shape == (5, 3, 336, 336)
    np.testing.assert_allclose(white.pixel_values.reshape(5, -1).mean(axis=1), 2.050372362136841, atol=1e-5)


def test_token_formula_and_size_helpers():
    # ((h/336)(w/336) + 1) * 144 + 1 + (h/336 + 1) * 12, evaluated by hand for a few grids.
    assert num_image_tokens((672, 672)) == 5 * 144 + 1 + 3 * 12
    assert num_image_tokens((1344, 1008)) == 13 * 144 + 1 + 5 * 12 == 1933
    assert num_image_tokens((336, 3360)) == 11 * 144 + 1 + 2 * 12 == 1609
    assert num_image_tokens((56, 84), crop=28, tokens_per_side=2) == 7 * 4 + 1 + 3 * 2
    for width, height in SIZES:
        for crops in (1, 4, 16):
            rows, cols = (side // 336 for side in hd_image_size(width, height, crops))
            assert 1 <= rows * cols <= crops
    for width, height in SIZES[:4]:
        out = HDTransform(num_crops=4)(np.full((height, width, 3), 90, dtype=np.uint8))
        assert out.image_size == hd_image_size(width, height, 4) and out.pixel_values.shape[0] == 5


def test_extreme_ratio_keeps_one_row_instead_of_failing():
    # 1 x 2000: the official resize height int(1344 / 2000) is 0; we clamp it to one pixel row.
    out = HDTransform(num_crops=4)(np.zeros((2000, 1, 3), dtype=np.uint8))
    assert out.image_size == (1344, 336) and out.crop_grid == (4, 1)


def test_rejects_bad_arrays():
    from octopus_rt.errors import InputError

    with pytest.raises(InputError):
        HDTransform()(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(InputError):
        HDTransform()(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(InputError):
        HDTransform(num_crops=0)

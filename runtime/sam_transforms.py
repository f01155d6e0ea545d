"""Segment Anything transforms in numpy + Pillow (torch-free): image resize and normalisation, prompt
mapping into the decoder's inputs, mask upscaling (segment-anything keeps the same steps in
`utils/transforms.py` and `Sam.preprocess` / `Sam.postprocess_masks`).

This is the one implementation of these transforms outside PyTorch: the runtime's SAM stage
(runtime/sam_stage.py) calls it, and `octopus-rt export sam` verifies it against
`segment_anything.SamPredictor` at three aspect ratios before writing a bundle.

Coordinate frames
-----------------
- *original*: the user's image, H x W pixels, points as (x, y) pixels.
- *resized*: the image scaled so its longest side is `input_size` (nh x nw, rounded half up as
  `ResizeLongestSide.get_preprocess_shape` does); the encoder sees it zero-padded at the bottom and
  right to input_size x input_size. Decoder point coordinates are in this frame.
- *low-res*: the decoder's mask logits, `input_size / 4` square for official SAM (256 x 256),
  covering the padded input square.

What SamPredictor does, and this module matches:
- image: `torchvision.transforms.functional.resize(to_pil_image(img), (nh, nw))`, i.e. Pillow's
  `Image.resize((nw, nh), BILINEAR)` (Pillow's bilinear filter is antialiased when shrinking),
  then `(x - mean) / std` in float32 and zero padding;
- masks: `F.interpolate(low_res, (S, S), "bilinear", align_corners=False)`, crop `[:nh, :nw]`,
  `F.interpolate(..., (H, W), "bilinear", align_corners=False)` (no antialias), threshold at 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from octopus_rt.errors import InputError

__all__ = [
    "resize_longest_side",
    "preprocess_image",
    "map_points",
    "prompt_inputs",
    "postprocess_masks",
    "resize_bilinear",
]


def resize_longest_side(h: int, w: int, target: int) -> tuple[int, int]:
    """(nh, nw) of an h x w image scaled so its longest side is `target` (rounded half up)."""
    if h <= 0 or w <= 0:
        raise InputError(f"image size must be positive, got {h}x{w}")
    scale = target * 1.0 / max(h, w)
    # Same float expression and rounding as segment_anything's get_preprocess_shape.
    return int(h * scale + 0.5), int(w * scale + 0.5)


def preprocess_image(
    rgb_uint8: np.ndarray,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize (longest side), normalise and zero-pad an RGB image for the SAM image encoder.

    rgb_uint8: H x W x 3 uint8, RGB. mean, std: 3 floats in 0-255 units (manifest `pixel_mean/std`).
    Returns (image, (nh, nw)): image is 1 x 3 x input_size x input_size float32 (padding is 0 after
    normalisation, as `Sam.preprocess` pads), (nh, nw) the resized size before padding.
    """
    image = np.asarray(rgb_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an H x W x 3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    nh, nw = resize_longest_side(h, w, input_size)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    out = np.zeros((1, 3, input_size, input_size), dtype=np.float32)
    out[0, :, :nh, :nw] = ((resized - mean_arr) / std_arr).transpose(2, 0, 1)
    return out, (nh, nw)


def map_points(xy: np.ndarray, orig_hw: tuple[int, int], resized_hw: tuple[int, int]) -> np.ndarray:
    """Map (..., 2) XY pixel points from the original frame into the resized frame (float32)."""
    points = np.asarray(xy, dtype=np.float64)
    if points.shape[-1:] != (2,):
        raise InputError(f"points must have shape (..., 2) as (x, y), got {points.shape}")
    (h, w), (nh, nw) = orig_hw, resized_hw
    scaled = points.copy()
    scaled[..., 0] *= nw / w
    scaled[..., 1] *= nh / h
    return scaled.astype(np.float32)


def prompt_inputs(
    points_xy: np.ndarray,
    labels: np.ndarray,
    orig_hw: tuple[int, int],
    resized_hw: tuple[int, int],
    mask_input_hw: tuple[int, int],
    mask_input: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The decoder graph's prompt inputs for N points in the original frame.

    points_xy: N x 2 (x, y) original pixels; labels: N (1 foreground, 0 background). The points are
    mapped into the resized frame and the padding point (0, 0) with label -1 is appended, as SAM's
    prompt encoder does when no box is given. mask_input: 1 x 1 x h x w low-res logits or None (then
    zeros of `mask_input_hw` and has_mask_input 0). Returns float32 (point_coords 1 x (N+1) x 2,
    point_labels 1 x (N+1), mask_input 1 x 1 x h x w, has_mask_input (1,)).
    """
    coords = map_points(np.asarray(points_xy, dtype=np.float64).reshape(-1, 2), orig_hw, resized_hw)
    coords = np.concatenate([coords, np.zeros((1, 2), np.float32)])[None].astype(np.float32)
    point_labels = np.concatenate([np.asarray(labels, dtype=np.float32).reshape(-1), [-1.0]]).astype(np.float32)[None]
    has_mask = mask_input is not None
    mask = np.asarray(mask_input, dtype=np.float32) if has_mask else np.zeros((1, 1, *mask_input_hw), np.float32)
    return coords, point_labels, mask, np.array([1.0 if has_mask else 0.0], dtype=np.float32)


def _linear_weights(in_size: int, out_size: int, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's linear interpolation (align_corners=False, no antialias).

    Output position i samples source coordinate max((i + 0.5) * in/out - 0.5, 0); only the first
    `keep` outputs are computed (cropping after resizing equals resizing only the kept rows).
    """
    scale = np.float32(in_size / out_size)
    dst = np.arange(keep, dtype=np.float32)
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    idx0 = np.minimum(src.astype(np.int64), in_size - 1)
    idx1 = np.minimum(idx0 + 1, in_size - 1)
    lam1 = (src - idx0).astype(np.float32)
    return idx0, idx1, lam1


def resize_bilinear(
    x: np.ndarray, size: tuple[int, int], keep: tuple[int, int] | None = None
) -> np.ndarray:
    """`torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)` in numpy.

    x: (..., h, w) float. size: (H, W) output size. keep: (kh, kw) to return only out[..., :kh, :kw]
    (computed directly, not by cropping). Returns float32.
    """
    x = np.asarray(x, dtype=np.float32)
    in_h, in_w = x.shape[-2:]
    out_h, out_w = size
    kh, kw = keep if keep is not None else size
    r0, r1, rl = _linear_weights(in_h, out_h, kh)
    c0, c1, cl = _linear_weights(in_w, out_w, kw)
    rows = x[..., r0, :] * (1.0 - rl)[:, None] + x[..., r1, :] * rl[:, None]
    return rows[..., c0] * (1.0 - cl) + rows[..., c1] * cl


def postprocess_masks(
    low_res: np.ndarray,
    input_size: int,
    resized_hw: tuple[int, int],
    orig_hw: tuple[int, int],
) -> np.ndarray:
    """Low-res mask logits -> mask logits at the original image size (what Sam.postprocess_masks does).

    low_res: 1 x M x h x w (or M x h x w) float logits from the decoder. Upscales bilinearly to
    input_size x input_size, crops the valid resized area (nh x nw), resizes to orig_hw (H, W).
    Returns M x H x W float32 logits; the mask is `logits > mask_threshold` (0.0).
    """
    masks = np.asarray(low_res, dtype=np.float32)
    if masks.ndim == 4:
        if masks.shape[0] != 1:
            raise InputError(f"low-res masks must have batch 1, got shape {masks.shape}")
        masks = masks[0]
    if masks.ndim != 3:
        raise InputError(f"low-res masks must be 1 x M x h x w, got shape {masks.shape}")
    nh, nw = resized_hw
    cropped = resize_bilinear(masks, (input_size, input_size), keep=(nh, nw))
    return resize_bilinear(cropped, tuple(orig_hw))

"""Image loading of the PyTorch reference pipeline, written apart from the runtime's on purpose.

The parity tests compare the runtime with export/reference.py; if both loaded images with the same
code, a bug in it (orientation, alpha, 16-bit scaling) could never show. This module implements the
rules the runtime documents (docs/runtime.md, "Images") from Pillow's documentation:

- `ImageOps.exif_transpose` applies the EXIF orientation tag (the frame viewers show);
- 16-bit / 32-bit integer images ("I;16", "I;16B", "I;16L", "I") scale to 8 bits by round(v / 257)
  (65535 -> 255); float images (mode "F" or float arrays) hold [0, 1] and scale by 255;
- every other mode goes through `Image.convert("RGB")` (alpha is dropped, not composited);
- arrays: H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA, alpha dropped), uint8 / uint16 / float.

Returns H x W x 3 uint8 RGB. Not a validator: the runtime's one-line input errors are tested on
the runtime; here a bad input just raises.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from octopus_rt.errors import OctopusError

__all__ = ["reference_rgb"]

_WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """Integer samples 0..65535 -> 0..255, round(v / 257) in integer arithmetic (no ties occur:
    v / 257 is never k + 0.5 for an integer v)."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((2 * wide + 257) // 514).astype(np.uint8)


def _from_unit_floats(values: np.ndarray) -> np.ndarray:
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise OctopusError("float images must lie in [0, 1]")
    return np.round(values.astype(np.float64) * 255.0).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.stack([grey, grey, grey], axis=-1)


def _from_pil(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_INTEGER_MODES:
        return _grey_to_rgb(_to_8bit(np.array(image.getdata(), dtype=np.int64).reshape(image.height, image.width)))
    if image.mode == "F":
        return _grey_to_rgb(_from_unit_floats(np.array(image, dtype=np.float64)))
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16:
        array = _to_8bit(array)
    elif array.dtype.kind == "f":
        array = _from_unit_floats(array)
    elif array.dtype == np.bool_:
        array = np.where(array, 255, 0).astype(np.uint8)
    array = array.astype(np.uint8)
    return _grey_to_rgb(array) if array.ndim == 2 else array


def reference_rgb(image: Any, max_pixels: int | None = None) -> np.ndarray:
    """A path, bytes, PIL image or array -> H x W x 3 uint8 RGB (rules in the module docstring)."""
    if isinstance(image, np.ndarray):
        rgb = _from_array(image)
    else:
        if isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(image)))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise OctopusError(f"image has {image.width * image.height} pixels, above the limit of {max_pixels}")
        rgb = _from_pil(image)
    return np.ascontiguousarray(rgb)

"""Image loading for the runtime: path, bytes, PIL image or array -> H x W x 3 uint8 RGB.

Rules (documented in docs/runtime.md):
- EXIF orientation is applied (the image is used the way viewers show it; points and masks are in
  that frame).
- RGBA, LA, P (palette), L, 1, CMYK, YCbCr ... -> RGB with Pillow's `convert("RGB")` (alpha is
  dropped, not composited), which is what the transformers image processors do.
- 16-bit and 32-bit integer images (modes I;16*, I) are scaled to 8 bits (round(v / 257)); the
  transformers processor would saturate them at 255 instead. Float images (mode F, float arrays) must
  lie in [0, 1] and are scaled by 255.
- Images with more than `max_pixels` pixels are refused *before* decoding (from the header), so a
  huge file cannot exhaust memory; the default is DEFAULT_MAX_PIXELS (64 megapixels).
- Missing, zero-size, unreadable or truncated files raise `InputError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from octopus_rt.errors import InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageInput",
    "LoadedImage",
    "PendingImage",
    "open_image",
    "load_image",
    "to_rgb_uint8",
    "content_key",
]

DEFAULT_MAX_PIXELS = 64_000_000

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


@dataclass(frozen=True)
class LoadedImage:
    """rgb: H x W x 3 uint8 RGB (C-contiguous). key: content hash (hex) used by the per-image cache:
    of the file bytes for paths/bytes (so a cache hit can skip decoding), else of the pixels."""

    rgb: np.ndarray
    key: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def content_key(data: bytes | memoryview | np.ndarray) -> str:
    """Hex blake2b-128 of raw bytes, or of an array's shape, dtype and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(data, np.ndarray):
        digest.update(f"{data.shape}{data.dtype.str}".encode())
        digest.update(np.ascontiguousarray(data).data)
    else:
        digest.update(data)
    return digest.hexdigest()


def _check_pixels(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{what} has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(
            f"{what} has {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
            "(downscale it, or raise max_pixels)"
        )


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes; InputError when it is missing, a directory, unreadable or empty."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if not path.is_file():
        raise InputError(f"image path is not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if not data:
        raise InputError(f"image file is empty (0 bytes): {path}")
    return data


def _decode(data: bytes, what: str, max_pixels: int | None) -> np.ndarray:
    if not data:
        raise InputError(f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow's own decompression-bomb warning is replaced by our explicit limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.width, image.height, max_pixels, what)
            image.load()
    except InputError:
        raise  # our own size check (InputError is a ValueError: it must not read as "corrupt" below)
    except UnidentifiedImageError as exc:
        raise InputError(f"{what} is not a readable image") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what} is too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated ...").
        raise InputError(f"{what} is truncated or corrupt ({exc})") from exc
    return to_rgb_uint8(image, what=what, max_pixels=max_pixels)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image.convert("I") if image.mode != "I" else image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode == "F":
        return _float_to_rgb(np.asarray(image, dtype=np.float64), "float image")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _float_to_rgb(values: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)) or values.min(initial=0.0) < 0.0 or values.max(initial=0.0) > 1.0:
        raise InputError(f"{what} must hold finite values in [0, 1]")
    scaled = np.rint(values * 255.0).astype(np.uint8)
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[:, :, None], 3, axis=2)
    return np.ascontiguousarray(scaled)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 (RGBA; alpha dropped) array, RGB channel order."""
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[:, :, :3] if array.shape[2] != 1 else array[:, :, 0]
    if array.ndim not in (2, 3):
        raise InputError(f"image array must be H x W or H x W x 3, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        array = np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        return _float_to_rgb(array.astype(np.float64), "float image array")
    elif array.dtype != np.uint8:
        raise InputError(f"image array dtype must be uint8, uint16, bool or float, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def to_rgb_uint8(image: Any, *, what: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A decoded PIL image or an array -> H x W x 3 uint8 RGB (rules in the module docstring)."""
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels, what)
        try:
            return _pil_to_rgb(image)
        except OSError as exc:
            raise InputError(f"{what} is truncated or corrupt ({exc})") from exc
    if isinstance(image, np.ndarray):
        if image.ndim < 2:
            raise InputError(f"image array must be H x W or H x W x 3, got shape {image.shape}")
        _check_pixels(int(image.shape[1]), int(image.shape[0]), max_pixels, what)
        return _array_to_rgb(image)
    raise InputError(f"unsupported image type {type(image).__name__}; pass a path, bytes, PIL image or array")


def load_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode any supported input into a `LoadedImage` (RGB uint8 + content key)."""
    if isinstance(image, (str, os.PathLike)):
        data = read_bytes(image)
        return LoadedImage(_decode(data, f"image {image}", max_pixels), content_key(data))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return LoadedImage(_decode(data, "image bytes", max_pixels), content_key(data))
    rgb = to_rgb_uint8(image, max_pixels=max_pixels)
    return LoadedImage(rgb, content_key(rgb))


@dataclass(frozen=True)
class PendingImage:
    """An image whose content key is known but which may not be decoded yet.

    For paths and bytes the key is the hash of the file bytes, so a per-image cache hit skips the
    decode entirely; `decode()` returns the H x W x 3 uint8 RGB array (decoding at most once).
    """

    key: str
    _data: bytes | None
    _rgb: np.ndarray | None
    _what: str
    _max_pixels: int | None

    def decode(self) -> np.ndarray:
        if self._rgb is not None:
            return self._rgb
        rgb = _decode(self._data or b"", self._what, self._max_pixels)
        object.__setattr__(self, "_rgb", rgb)
        return rgb


def open_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PendingImage:
    """Read (not decode) a path or bytes, or convert a PIL image / array; compute the content key."""
    if isinstance(image, (str, os.PathLike)):
        data = read_bytes(image)
        return PendingImage(content_key(data), data, None, f"image {image}", max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InputError("image bytes are empty (0 bytes)")
        return PendingImage(content_key(data), data, None, "image bytes", max_pixels)
    rgb = to_rgb_uint8(image, max_pixels=max_pixels)
    return PendingImage(content_key(rgb), None, rgb, "image", max_pixels)

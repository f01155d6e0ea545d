"""Source images of `data synth`: listing a folder, loading a source safely, hashing it.

A source is loaded as (H, W, 3) uint8 RGB with its EXIF rotation applied and its long side at most
`size` (larger ones downscaled with INTER_AREA); sources under MIN_SIDE pixels on a side or whose
header promises more than MAX_SOURCE_PIXELS pixels are refused. `dhash` gives the 64-bit perceptual
hash by which near-duplicate sources are grouped into one split (training/data/synth.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from octopus_rt.errors import InputError
from octopus_rt.runtime.images import DEFAULT_MAX_PIXELS

__all__ = ["IMAGE_EXTENSIONS", "MIN_SIDE", "MAX_SOURCE_PIXELS", "list_sources", "open_limited", "load_source", "dhash"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MIN_SIDE = 32
# Sources and label maps above this are skipped before decoding (a 420 KB PNG can claim 12000 x 12000
# pixels and take gigabytes): the runtime's own limit, 64 megapixels.
MAX_SOURCE_PIXELS = DEFAULT_MAX_PIXELS


def list_sources(src_dir: Path) -> list[Path]:
    """Image files directly in `src_dir` (by extension), sorted by name."""
    if not src_dir.is_dir():
        raise InputError(f"source folder not found: {src_dir}")
    files = sorted(p for p in src_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {src_dir}")
    return files


def open_limited(path: Path, what: str = "the image"):
    """The PIL image at `path`, opened lazily (header read, nothing decoded) after checking that it holds
    at most MAX_SOURCE_PIXELS pixels. ValueError (one line, prefixed with `what`) when it is larger or
    unreadable as an image (message: `what` is / has ...); use it as a context manager."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{what} is too large to decode safely ({exc})") from None
        except OSError as exc:
            raise ValueError(f"{what} is unreadable ({exc})") from None
    if im.width * im.height > MAX_SOURCE_PIXELS:
        size = f"{im.width}x{im.height} = {im.width * im.height}"
        im.close()
        raise ValueError(f"{what} has {size} pixels, above the limit of {MAX_SOURCE_PIXELS} (downscale it)")
    return im


def load_source(path: Path, size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB, long side at most `size`. Raises ValueError / OSError when unusable,
    ValueError before decoding when the header promises more than MAX_SOURCE_PIXELS pixels."""
    import cv2
    from PIL import ImageOps

    with open_limited(path) as im:
        # phone photos store their rotation in EXIF; apply it so masks match what people see
        image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"too small ({width}x{height} < {MIN_SIDE}x{MIN_SIDE})")
    scale = size / max(height, width)
    if scale < 1.0:
        new = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
        image = cv2.resize(image, new, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of a (H, W, 3) uint8 image (9x8 grayscale, horizontal gradients)."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))

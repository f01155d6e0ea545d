"""Phi-3(.5)-Vision's HD transform in numpy + Pillow: one image -> crops, global view, token count.

The model was trained with Microsoft's `Phi3VImageProcessor` (processing_phi3_v.py), so this module
reproduces it step by step (sources in docs/phi3v.md):

1. RGB image of width W x height H. A portrait image (W < H) is transposed (PIL TRANSPOSE) first.
2. ratio = W / H; scale = the largest s with s * ceil(s / ratio) <= num_crops.
3. Resize (Pillow bilinear, i.e. torchvision's `resize` on a PIL image) to width s * crop and height
   int(s * crop / ratio); pad the height with white rows to a multiple of `crop`, top padding
   int((target - h) / 2); transpose back.
4. float32 pixel / 255, minus the CLIP mean, divided by the CLIP std (torchvision ToTensor + Normalize).
5. Global view: torch bicubic (a = -0.75, align_corners=False, no antialias) of the *normalised* HD
   image to crop x crop (`bicubic_resize` below is a numpy port of that kernel).
6. pixel_values = [global view, crops row by row], zero crops appended up to num_crops + 1.

Output frames: `pixel_values` float32 (num_crops + 1) x 3 x crop x crop, channels RGB; `image_size`
is the padded HD image's (height, width) in pixels, both multiples of `crop`.

The image-token count is the official ((h/c)(w/c) + 1) * m^2 + 1 + (h/c + 1) * m with m = 12 merged
tokens per crop side (336 / 14 / 2); `tokens_per_side` generalises it for small test towers.

One deliberate deviation: for aspect ratios so extreme that int(s * crop / ratio) is 0 (the official
code then fails inside Pillow), the resized height is clamped to one pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from octopus_rt.errors import InputError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HDImage",
    "HDTransform",
    "bicubic_resize",
    "hd_image_size",
    "num_image_tokens",
]

# OpenAI CLIP normalisation (transformers.image_utils.OPENAI_CLIP_MEAN / _STD), used by Phi3VImageProcessor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CUBIC_A = np.float32(-0.75)  # torch's bicubic coefficient (upsample_bicubic2d)


def _hd_scale(ratio: float, num_crops: int) -> int:
    """Largest scale s >= 1 with s * ceil(s / ratio) <= num_crops (ratio = long side / short side)."""
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return max(scale - 1, 1)


def _resized_size(width: int, height: int, num_crops: int, crop: int) -> tuple[int, int]:
    """(new_w, new_h) of the resize step for a landscape (width >= height) image."""
    ratio = width / height
    new_w = int(_hd_scale(ratio, num_crops) * crop)
    return new_w, max(int(new_w / ratio), 1)


def hd_image_size(width: int, height: int, num_crops: int, crop: int = 336) -> tuple[int, int]:
    """(height, width) of the padded HD image for an input of width x height (no pixels touched)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    new_w, new_h = _resized_size(width, height, num_crops, crop)
    padded_h = int(math.ceil(new_h / crop) * crop)
    return (new_w, padded_h) if transposed else (padded_h, new_w)


def num_image_tokens(image_size: tuple[int, int], crop: int = 336, tokens_per_side: int = 12) -> int:
    """Image tokens of one HD image of (height, width): ((h/c)(w/c) + 1) m^2 + 1 + (h/c + 1) m."""
    rows, cols = image_size[0] // crop, image_size[1] // crop
    m = tokens_per_side
    return (rows * cols + 1) * m * m + 1 + (rows + 1) * m


def _cubic_coefficients(t: np.ndarray) -> np.ndarray:
    """torch's get_cubic_upsample_coefficients in float32: weights of taps -1, 0, +1, +2 for offset t."""
    a = _CUBIC_A
    one = np.float32(1.0)

    def near(x):  # |x| <= 1
        return ((a + np.float32(2.0)) * x - (a + np.float32(3.0))) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - np.float32(5.0) * a) * x + np.float32(8.0) * a) * x - np.float32(4.0) * a

    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=1).astype(np.float32)


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (out, 4) clamped to the input and float32 weights (out, 4), align_corners=False."""
    scale = np.float32(in_size) / np.float32(out_size)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # scale * centre - 0.5 rounded once, as the fused multiply-add of torch's compiled x86 kernel
    # (measured: 10x closer to torch than two float32 roundings at non-integer scales).
    src = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)
    # Bicubic does not clamp negative source coordinates (unlike bilinear); the taps are clamped instead.
    index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - index.astype(np.float32), np.float32(0.0), np.float32(1.0))
    taps = np.clip(index[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return taps, _cubic_coefficients(t)


def bicubic_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """C x H x W float32 -> C x out_h x out_w, as torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False, antialias=False) on CPU: width taps first, then height, accumulated in float32."""
    image = np.asarray(image, dtype=np.float32)
    x_taps, x_weights = _cubic_taps(image.shape[2], out_w)
    y_taps, y_weights = _cubic_taps(image.shape[1], out_h)
    rows = image[:, :, x_taps[:, 0]] * x_weights[:, 0]
    for k in range(1, 4):
        rows = rows + image[:, :, x_taps[:, k]] * x_weights[:, k]
    out = rows[:, y_taps[:, 0], :] * y_weights[:, 0, None]
    for k in range(1, 4):
        out = out + rows[:, y_taps[:, k], :] * y_weights[:, k, None]
    return out.astype(np.float32, copy=False)


@dataclass(frozen=True)
class HDImage:
    """One image after the HD transform.

    pixel_values: float32 (num_crops + 1) x 3 x crop x crop: global view, crops row-major, zero crops.
    image_size: (height, width) of the padded HD image in pixels.
    num_img_tokens: image tokens the model's embedding produces for it (prompt placeholder count).
    """

    pixel_values: np.ndarray
    image_size: tuple[int, int]
    num_img_tokens: int
    crop: int

    @property
    def crop_grid(self) -> tuple[int, int]:
        """(rows, cols) of crops tiling the HD image."""
        return self.image_size[0] // self.crop, self.image_size[1] // self.crop

    @property
    def num_used_crops(self) -> int:
        """Global view + real crops: the leading rows of pixel_values that carry pixels."""
        rows, cols = self.crop_grid
        return 1 + rows * cols


@dataclass(frozen=True)
class HDTransform:
    """Phi3VImageProcessor's preprocessing (module docstring). num_crops = 4 for Phi-3.5-Vision."""

    num_crops: int = 4
    crop: int = 336
    tokens_per_side: int = 12
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.num_crops < 1 or self.crop < 1 or self.tokens_per_side < 1:
            raise InputError(f"HD transform needs num_crops, crop and tokens_per_side >= 1, got {self}")

    def hd_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Steps 1-3: the resized, white-padded HD image, H x W x 3 uint8 (H, W multiples of crop)."""
        pil = _to_rgb_pil(image)
        transposed = pil.width < pil.height
        if transposed:
            pil = pil.transpose(Image.Transpose.TRANSPOSE)
        new_w, new_h = _resized_size(pil.width, pil.height, self.num_crops, self.crop)
        resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR))
        target = int(math.ceil(new_h / self.crop) * self.crop)
        top = int((target - new_h) / 2)
        padded = np.full((target, new_w, 3), 255, dtype=np.uint8)
        padded[top : top + new_h] = resized
        return np.ascontiguousarray(padded.transpose(1, 0, 2)) if transposed else padded

    def normalize(self, hd: np.ndarray) -> np.ndarray:
        """Step 4: H x W x 3 uint8 -> 3 x H x W float32 ((x / 255 - mean) / std, in float32)."""
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        pixels = hd.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        return (pixels - mean) / std

    def __call__(self, image: Image.Image | np.ndarray) -> HDImage:
        """Steps 1-6 for one RGB image (PIL image of any mode, or H x W x 3 uint8)."""
        hd = self.normalize(self.hd_image(image))
        height, width = hd.shape[1:]
        rows, cols = height // self.crop, width // self.crop
        c = self.crop
        crops = hd.reshape(3, rows, c, cols, c).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, c, c)
        pixel_values = np.zeros((self.num_crops + 1, 3, c, c), dtype=np.float32)
        pixel_values[0] = bicubic_resize(hd, c, c)
        pixel_values[1 : 1 + rows * cols] = crops
        size = (int(height), int(width))
        return HDImage(pixel_values, size, num_image_tokens(size, c, self.tokens_per_side), c)


def _to_rgb_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"expected an H x W x 3 uint8 RGB array, got {array.dtype} {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"image has no pixels ({array.shape[1]}x{array.shape[0]})")
    return Image.fromarray(array)

"""Overlay of an answer on its image: translucent mask, point marker, answer caption (Pillow only)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["OverlayStyle", "render_overlay", "mask_to_png"]


@dataclass(frozen=True)
class OverlayStyle:
    """Colours are RGB; alpha is the mask's opacity in [0, 1]; images narrower than min_width are
    enlarged (nearest neighbour, so pixels stay visible) to keep the caption readable."""

    mask_color: tuple[int, int, int] = (255, 40, 40)
    alpha: float = 0.45
    point_color: tuple[int, int, int] = (40, 255, 40)
    caption_max_lines: int = 4
    min_width: int = 384


def mask_to_png(mask: np.ndarray) -> Image.Image:
    """H x W bool -> 8-bit grey PIL image (255 inside, 0 outside)."""
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L")


def render_overlay(
    rgb: np.ndarray,
    mask: np.ndarray | None,
    point: tuple[float, float] | None,
    caption: str,
    style: OverlayStyle | None = None,
) -> Image.Image:
    """RGB image (H x W x 3 uint8) with the mask blended in, the point (original pixels) as a ringed
    cross, and the caption in a band below. Returns a new RGB PIL image, k * W wide with k >= 1 the
    integer enlargement for `style.min_width`."""
    style = style or OverlayStyle()
    scale = max(1, -(-style.min_width // max(1, rgb.shape[1])))
    base = np.asarray(rgb, dtype=np.float32).copy()
    if mask is not None:
        inside = np.asarray(mask, dtype=bool)
        color = np.asarray(style.mask_color, dtype=np.float32)
        base[inside] = (1.0 - style.alpha) * base[inside] + style.alpha * color
    image = Image.fromarray(np.clip(base + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    height, width = image.height, image.width
    draw = ImageDraw.Draw(image)
    if point is not None:
        x, y = point[0] * scale, point[1] * scale
        radius = max(3, min(width, height) // 40)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=style.point_color, width=max(1, radius // 3))
        draw.line((x - 2 * radius, y, x + 2 * radius, y), fill=style.point_color, width=1)
        draw.line((x, y - 2 * radius, x, y + 2 * radius), fill=style.point_color, width=1)
    font_size = max(12, min(24, width // 30))
    chars = max(16, int(width / (0.6 * font_size)))
    lines = textwrap.wrap(caption.strip() or "(empty answer)", width=chars)[: style.caption_max_lines]
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    line_height = font_size + 4
    band = line_height * len(lines) + 8
    canvas = Image.new("RGB", (width, height + band), (0, 0, 0))
    canvas.paste(image, (0, 0))
    text_draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        text_draw.text((4, height + 4 + index * line_height), line, fill=(255, 255, 255), font=font)
    return canvas

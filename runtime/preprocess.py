"""Vision preprocessing in numpy + Pillow, driven by the bundle manifest's `lmm.preprocess` section.

Matches the transformers image processor that the model was exported with (CLIP: shortest-edge resize
+ centre crop; SigLIP: resize to height x width), for both of its backends:
- resize: Pillow's resampling with the manifest's filter on the uint8 image. For the PIL backend
  that is one `Image.resize` call, i.e. the processor itself. The torchvision backend's antialiased
  uint8 resize is a port of Pillow's separable filter that always runs the horizontal pass first,
  while Pillow picks the pass order itself; so for `backend: "torchvision"` we run two one-axis
  passes, horizontal then vertical, and agree to within one grey level (measured: < 1% of values
  differ, by one or rarely two levels, from fixed-point rounding).
- output size for {"shortest_edge": s}: short side s, long side int(s * long / short), as
  `transformers.image_transforms.get_resize_output_image_size(default_to_square=False)`.
- centre crop: top = int((h - ch) / 2), left = int((w - cw) / 2); an image smaller than the crop is
  zero-padded first ((d // 2) before, (d + 1) // 2 after), as the processors do.
- rescale and normalise in float32: (x * rescale_factor - mean) / std.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from octopus_rt.errors import OctopusError
from octopus_rt.manifest_lmm import VisionPreprocessSpec

__all__ = ["VisionPreprocess"]

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    # transformers' PILImageResampling integer codes, in case a manifest stores those.
    "0": Image.NEAREST,
    "1": Image.LANCZOS,
    "2": Image.BILINEAR,
    "3": Image.BICUBIC,
    "4": Image.BOX,
    "5": Image.HAMMING,
}


@dataclass(frozen=True)
class VisionPreprocess:
    """The resize / crop / normalise recipe of one bundle (see the module docstring)."""

    do_resize: bool
    size: dict[str, int]
    resample: int
    do_center_crop: bool
    crop_size: dict[str, int] | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    input_height: int
    input_width: int
    backend: str = "torchvision"

    @classmethod
    def from_manifest(cls, section: VisionPreprocessSpec | Mapping[str, Any]) -> VisionPreprocess:
        """Build from the manifest's `lmm.preprocess` (typed, or its dict); OctopusError on an
        unsupported recipe, BundleError on a missing or mistyped field."""
        spec = section if isinstance(section, VisionPreprocessSpec) else VisionPreprocessSpec.from_dict(
            dict(section), "lmm.preprocess")
        resample_key = str(spec.resample if spec.resample is not None else "bicubic").lower()
        if resample_key not in _RESAMPLE:
            raise OctopusError(f"bundle asks for unsupported resample filter {resample_key!r}")
        if spec.size is None:
            raise OctopusError("bundle manifest has an unusable lmm.preprocess section (no size)")
        return cls(
            do_resize=spec.do_resize,
            size=dict(spec.size),
            resample=_RESAMPLE[resample_key],
            do_center_crop=spec.do_center_crop,
            crop_size=dict(spec.crop_size) if spec.crop_size else None,
            do_rescale=spec.do_rescale,
            rescale_factor=float(spec.rescale_factor),
            do_normalize=spec.do_normalize,
            image_mean=tuple(float(v) for v in spec.image_mean),
            image_std=tuple(float(v) for v in spec.image_std),
            input_height=spec.input_height,
            input_width=spec.input_width,
            backend=spec.backend or "torchvision",
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step for an input of height x width."""
        if not self.do_resize:
            return height, width
        if "shortest_edge" in self.size:
            edge = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)
            return (new_long, edge) if width <= height else (edge, new_long)
        if "height" in self.size and "width" in self.size:
            return self.size["height"], self.size["width"]
        raise OctopusError(f"unsupported resize size {self.size} in the bundle manifest")

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 RGB -> 1 x 3 x input_height x input_width float32 pixel_values."""
        height, width = rgb.shape[:2]
        new_h, new_w = self.output_size(height, width)
        image = rgb
        if (new_h, new_w) != (height, width):
            pil = Image.fromarray(rgb)
            if self.backend == "pil":
                pil = pil.resize((new_w, new_h), self.resample)
            else:
                # torchvision order: horizontal pass, then vertical (see the module docstring).
                if new_w != width:
                    pil = pil.resize((new_w, height), self.resample)
                if new_h != height:
                    pil = pil.resize((new_w, new_h), self.resample)
            image = np.asarray(pil)
        if self.do_center_crop and self.crop_size:
            image = _center_crop(image, self.crop_size["height"], self.crop_size["width"])
        pixels = image.astype(np.float32)
        if self.do_rescale:
            pixels *= np.float32(self.rescale_factor)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        out = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
        if out.shape[2:] != (self.input_height, self.input_width):
            raise OctopusError(
                f"preprocessing produced {out.shape[2]}x{out.shape[3]} pixels but the vision graph "
                f"expects {self.input_height}x{self.input_width}; the manifest's preprocess section is inconsistent"
            )
        return out


def _center_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    height, width = image.shape[:2]
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        image = np.pad(image, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = image.shape[:2]
    top = int((height - crop_h) / 2.0)
    left = int((width - crop_w) / 2.0)
    return image[top : top + crop_h, left : left + crop_w]

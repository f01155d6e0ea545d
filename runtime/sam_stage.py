"""The SAM stage: one owner of the image embedding, like segment-anything's `SamPredictor`.

    stage = SamStage(backend, bundle_dir, parse_manifest(manifest).sam)
    stage.set_image(rgb)                       # preprocess + image encoder, once per image
    result = stage.predict((x, y))             # prompt encoder + mask decoder + upscaling, per point
    result.mask, result.iou

`set_image` returns the `SamImage` it holds, so a caller that keeps several images (the runtime's
per-image cache) can pass one back to `predict(point, image=...)` without re-encoding;
`predict_cached` does that for an entry of runtime/cache.py's per-image cache (what `Octopus` uses).

Frames (runtime/sam_transforms.py, the one numpy implementation of SAM's transforms): the point comes
in original pixels (x, y); it is mapped into the encoder's resized frame (longest side =
`input_size`), the padding point (0, 0) with label -1 is appended (as SAM's prompt encoder does
without a box), and the kept low-res mask is upscaled, cropped to the valid area and resized to the
original H x W, then thresholded at the manifest's mask_threshold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import numpy as np

from octopus_rt.errors import InputError
from octopus_rt.manifest import SamSection
from octopus_rt.runtime import sam_transforms
from octopus_rt.runtime.backends import Backend
from octopus_rt.runtime.cache import ImageEntry
from octopus_rt.runtime.results import MaskResult

__all__ = ["SamImage", "SamStage"]

# A timer hook: stage name -> context manager that times the block (Octopus passes its per-call timer).
StageTimer = Callable[[str], ContextManager[Any]]


def _untimed(_name: str) -> ContextManager[Any]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class SamImage:
    """One image's SAM embedding. embedding: the encoder output 1 x C x h x w (an OrtValue on the
    backend's device); original_hw: (H, W) of the image; resized_hw: (nh, nw) after the longest-side
    resize (before padding)."""

    embedding: Any
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]


class SamStage:
    """Encoder + decoder graphs of the manifest's `sam` section, sessions created lazily on the backend."""

    def __init__(self, backend: Backend, bundle_dir: Path, section: SamSection) -> None:
        self.backend = backend
        self.folder = Path(bundle_dir) / str(section.dir)
        self.encoder_spec = section.encoder
        self.decoder_spec = section.decoder
        self.input_size = section.input_size
        self.pixel_mean = tuple(section.preprocess.pixel_mean)
        self.pixel_std = tuple(section.preprocess.pixel_std)
        self.mask_threshold = section.mask_threshold
        # mask_input is 1 x 1 x 4h x 4w for an h x w embedding grid (256 x 256 for official SAM);
        # derived from the embedding shape, which every SAM section records unambiguously.
        grid_h, grid_w = section.encoder.embedding_shape[-2:]
        self.mask_input_hw = (4 * grid_h, 4 * grid_w)
        self.image: SamImage | None = None

    def load(self) -> None:
        """Create both sessions now (otherwise they are created on first use)."""
        self._encoder()
        self._decoder()

    def _encoder(self):
        return self.backend.graph("sam_encoder", self.folder / self.encoder_spec.file)

    def _decoder(self):
        return self.backend.graph("sam_decoder", self.folder / self.decoder_spec.file)

    def set_image(self, rgb: np.ndarray, *, timer: StageTimer = _untimed) -> SamImage:
        """Embed an H x W x 3 uint8 RGB image (stages "sam_preprocess", "sam_encoder"); the stage
        holds the result for `predict` and returns it."""
        with timer("sam_preprocess"):
            pixels, resized = sam_transforms.preprocess_image(rgb, self.input_size, self.pixel_mean, self.pixel_std)
        input_name, output_name = self.encoder_spec.input_names[0], self.encoder_spec.output_names[0]
        encoder = self._encoder()
        with timer("sam_encoder"):
            embedding = encoder.run({input_name: pixels}, [output_name])[0]
        self.image = SamImage(embedding, (int(rgb.shape[0]), int(rgb.shape[1])), resized)
        return self.image

    def predict(
        self,
        point_xy: tuple[float, float],
        *,
        multimask: bool = True,
        image: SamImage | None = None,
        timer: StageTimer = _untimed,
    ) -> MaskResult:
        """The mask for one positive point (x, y) in original pixels on `image` (default: the image
        of the last `set_image`). Stages "sam_decoder" and "postprocess".

        multimask: keep the best predicted IoU among the multimask outputs (1..M-1, as SamPredictor
        with multimask_output=True), else the single-mask output 0. Returns mask H x W bool and
        SAM's predicted IoU of it (`cached` is left False: caching is the caller's business).
        """
        image = image if image is not None else self.image
        if image is None:
            raise InputError("no image is set: call set_image(rgb) before predict(point)")
        names = self.decoder_spec.input_names
        prompt = sam_transforms.prompt_inputs(
            np.asarray([point_xy], dtype=np.float64), np.ones(1), image.original_hw, image.resized_hw, self.mask_input_hw
        )
        out_names = self.decoder_spec.output_names
        decoder = self._decoder()
        with timer("sam_decoder"):
            low_res, iou = decoder.run_numpy(dict(zip(names, [image.embedding, *prompt])), out_names)
        with timer("postprocess"):
            iou = np.asarray(iou).reshape(-1)
            index = 1 + int(np.argmax(iou[1:])) if multimask and iou.shape[0] > 1 else 0
            logits = sam_transforms.postprocess_masks(
                low_res[:, index : index + 1], self.input_size, image.resized_hw, image.original_hw
            )
        return MaskResult(mask=logits[0] > self.mask_threshold, iou=float(iou[index]))

    def predict_cached(
        self,
        entry: ImageEntry,
        rgb: Callable[[], np.ndarray],
        point_xy: tuple[float, float],
        *,
        multimask: bool,
        timer: StageTimer,
        cached: list[str],
    ) -> MaskResult:
        """`predict` on a per-image cache entry's image, its embedding computed once per entry (kept in
        `entry.sam_image`; "sam_embedding" is appended to `cached` when it is reused). rgb: gives the
        H x W x 3 uint8 image, called only when the embedding must be computed."""
        self.load()  # session creation stays outside the stage timers (it is reported as load_sessions)
        if entry.sam_image is None:
            entry.sam_image = self.set_image(rgb(), timer=timer)
        else:
            cached.append("sam_embedding")
        return self.predict(point_xy, multimask=multimask, image=entry.sam_image, timer=timer)

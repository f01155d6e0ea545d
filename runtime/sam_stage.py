"""The SAM stage: image embedding once per image, then one decoder call per point.

Uses runtime/sam_postprocess.py (the one numpy implementation of SAM's resize, point mapping and
mask upscaling). Frames: the point comes in original pixels (x, y); it is mapped into the encoder's
resized frame (longest side = `input_size`), the padding point (0, 0) with label -1 is appended (as
SAM's prompt encoder does without a box), and the kept low-res mask is upscaled, cropped to the
valid area and resized to the original H x W, then thresholded at the manifest's mask_threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from octopus_rt.runtime import sam_postprocess
from octopus_rt.runtime.backends import Backend

__all__ = ["SamResult", "SamStage"]


@dataclass
class SamResult:
    """mask: H x W bool; iou: SAM's predicted IoU of that mask; index: which decoder output was kept
    (0 = single-mask output, 1.. = multimask outputs)."""

    mask: np.ndarray
    iou: float
    index: int


class SamStage:
    """Encoder + decoder graphs of the manifest's `sam` section, created lazily on the backend."""

    def __init__(self, backend: Backend, bundle_dir: Path, section: dict[str, Any]) -> None:
        self.backend = backend
        self.folder = Path(bundle_dir) / section["dir"]
        self.encoder_spec = section["encoder"]
        self.decoder_spec = section["decoder"]
        pre = section.get("preprocess", {})
        self.input_size = int(pre.get("input_size", self.encoder_spec.get("input_size", 1024)))
        self.pixel_mean = tuple(float(v) for v in pre.get("pixel_mean", (123.675, 116.28, 103.53)))
        self.pixel_std = tuple(float(v) for v in pre.get("pixel_std", (58.395, 57.12, 57.375)))
        self.mask_threshold = float(section.get("mask_threshold", 0.0))
        # mask_input is 1 x 1 x 4h x 4w for an h x w embedding grid (256 x 256 for official SAM);
        # derived from the embedding shape, which every SAM section records unambiguously.
        grid_h, grid_w = (int(v) for v in self.encoder_spec.get("embedding_shape", [1, 256, 64, 64])[-2:])
        self.mask_input_hw = (4 * grid_h, 4 * grid_w)

    def load(self) -> None:
        """Create both sessions now (otherwise they are created on first use)."""
        self.backend.graph("sam_encoder", self.folder / self.encoder_spec["file"])
        self.backend.graph("sam_decoder", self.folder / self.decoder_spec["file"])

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """H x W x 3 uint8 -> (1 x 3 x S x S float32 normalised + padded, resized (nh, nw))."""
        return sam_postprocess.preprocess_image(rgb, self.input_size, self.pixel_mean, self.pixel_std)

    def encode(self, image: np.ndarray) -> Any:
        """Encoder: preprocessed image -> image embedding (OrtValue on the backend's device)."""
        graph = self.backend.graph("sam_encoder", self.folder / self.encoder_spec["file"])
        input_name = self.encoder_spec.get("input_names", ["image"])[0]
        output_name = self.encoder_spec.get("output_names", ["image_embeddings"])[0]
        return graph.run({input_name: image}, [output_name])[0]

    def decode(
        self,
        embedding: Any,
        point_xy: tuple[float, float],
        orig_hw: tuple[int, int],
        resized_hw: tuple[int, int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decoder for one positive point (original pixels). Returns (low_res_masks 1 x M x h x w,
        iou_predictions (M,)) as numpy."""
        graph = self.backend.graph("sam_decoder", self.folder / self.decoder_spec["file"])
        point = sam_postprocess.map_points(np.asarray([point_xy], dtype=np.float64), orig_hw, resized_hw)
        coords = np.concatenate([point, np.zeros((1, 2), dtype=np.float32)])[None].astype(np.float32)
        labels = np.asarray([[1.0, -1.0]], dtype=np.float32)
        mask_h, mask_w = self.mask_input_hw
        names = self.decoder_spec.get(
            "input_names", ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
        )
        feeds = dict(
            zip(
                names,
                [
                    embedding,
                    coords,
                    labels,
                    np.zeros((1, 1, mask_h, mask_w), dtype=np.float32),
                    np.zeros((1,), dtype=np.float32),
                ],
            )
        )
        out_names = self.decoder_spec.get("output_names", ["low_res_masks", "iou_predictions"])
        low_res, iou = graph.run_numpy(feeds, out_names)
        return low_res, np.asarray(iou).reshape(-1)

    def select(self, iou: np.ndarray, multimask: bool = True) -> int:
        """Index of the kept mask: best predicted IoU among the multimask outputs (1..M-1, as
        SamPredictor with multimask_output=True), or the single-mask output 0."""
        if multimask and iou.shape[0] > 1:
            return 1 + int(np.argmax(iou[1:]))
        return 0

    def masks_at(
        self, low_res: np.ndarray, index: int, orig_hw: tuple[int, int], resized_hw: tuple[int, int]
    ) -> np.ndarray:
        """The kept low-res mask -> H x W bool at the original size."""
        logits = sam_postprocess.postprocess_masks(low_res[:, index : index + 1], self.input_size, resized_hw, orig_hw)
        return logits[0] > self.mask_threshold

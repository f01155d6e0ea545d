"""Verification of an exported SAM section (part of `octopus-rt export sam`).

Two checks, both in onnxruntime on CPU:

1. End to end against `segment_anything.SamPredictor`: the runtime's numpy pipeline
   (runtime/sam_transforms.py + the two graphs) and the predictor segment the same synthetic image
   from the same point, at three aspect ratios (768x1024, 1024x1024, 2250x1500 for input size
   1024, scaled for smaller inputs), each with a one-point prompt, a foreground + background prompt
   and the one-point prompt refined with its best low-res mask as mask input; every one of the
   1 + K masks must reach the IoU threshold at the original image size.
2. The TensorRT-friendly decoder against segment-anything's own `SamOnnxModel` exported the
   official way (TorchScript exporter, opset as requested). SamOnnxModel crops with
   `int(prepadded_size)`, which freezes the crop to the dummy input's aspect ratio, so the two are
   compared on the low-res logits and on their bilinear upscale to input_size (before any crop),
   where both are correct: mask IoU >= 0.999. SamOnnxModel is only a reference and is never shipped.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from octopus_rt.errors import OctopusError
from octopus_rt.runtime.sam_transforms import postprocess_masks, preprocess_image, prompt_inputs, resize_bilinear

__all__ = [
    "SamVerificationError",
    "SamVerification",
    "verification_sizes",
    "verification_image",
    "mask_iou",
    "verify_sam",
    "compare_with_sam_onnx_model",
    "DECODER_INPUTS",
]

DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
# Parity thresholds (issues 2 and 7).
IOU_THRESHOLDS = {"fp32": 0.99, "fp16": 0.98}
TRT_FRIENDLY_IOU = 0.999
_OFFICIAL_SIZES = ((768, 1024), (1024, 1024), (2250, 1500))


class SamVerificationError(OctopusError):
    """The exported graphs do not reproduce segment-anything within the thresholds."""


@dataclass
class SamVerification:
    """Results of verify_sam; `summary()` goes into the manifest section."""

    precision: str
    threshold: float
    cases: list[dict[str, Any]] = field(default_factory=list)
    trt_friendly: dict[str, Any] = field(default_factory=dict)

    @property
    def min_iou(self) -> float:
        return min(case["min_iou"] for case in self.cases)

    def summary(self) -> dict[str, Any]:
        return {
            "reference": "segment_anything.SamPredictor",
            "threshold": self.threshold,
            "min_mask_iou": round(self.min_iou, 6),
            "cases": self.cases,
            "trt_friendly_vs_SamOnnxModel": self.trt_friendly,
        }


def verification_sizes(input_size: int) -> list[tuple[int, int]]:
    """The three (H, W) image sizes checked: the official ones scaled by input_size / 1024."""
    scale = input_size / 1024
    return [(max(8, round(h * scale)), max(8, round(w * scale))) for h, w in _OFFICIAL_SIZES]


def verification_image(h: int, w: int) -> np.ndarray:
    """A deterministic H x W x 3 uint8 RGB test image: smooth background, a bright ellipse, texture.

    Built in relative coordinates, so every size shows the same scene (the point lies on the ellipse).
    """
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = x / w, y / h
    inside = ((u - 0.42) / 0.22) ** 2 + ((v - 0.55) / 0.28) ** 2 <= 1.0
    texture = 0.5 + 0.5 * np.sin(40 * u + 25 * v) * np.cos(31 * v - 12 * u)
    r = 40 + 80 * u + 30 * texture
    g = 60 + 60 * v + 20 * texture
    b = 90 + 40 * (1 - u) + 25 * texture
    image = np.stack([r, g, b], axis=-1)
    image[inside] = np.array([230.0, 200.0, 60.0]) + 20 * texture[inside, None]
    return np.clip(image, 0, 255).astype(np.uint8)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two boolean masks; an empty union counts as IoU 1."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def make_session(path: str | os.PathLike[str]):
    """A CPU onnxruntime session with one intra-op thread (the export machines are shared)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # fp16 graphs log one "cannot constant fold" warning per node on CPU
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prompts(h: int, w: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, points N x 2 XY in the original frame, labels N) prompts for an H x W image."""
    one = np.array([[0.42 * w, 0.55 * h]])
    two = np.array([[0.42 * w, 0.55 * h], [0.85 * w, 0.15 * h]])
    return [("point", one, np.array([1])), ("fg+bg", two, np.array([1, 0]))]


def _reference_predictions(predictor: Any, prompt: tuple) -> dict[str, np.ndarray]:
    """SamPredictor's logits for all 1 + K masks (index 0 single-mask) at the original size."""
    _, points, labels = prompt
    multi, multi_iou, multi_low = predictor.predict(points, labels, multimask_output=True, return_logits=True)
    single, single_iou, single_low = predictor.predict(points, labels, multimask_output=False, return_logits=True)
    return {
        "masks": np.concatenate([single, multi]),
        "iou": np.concatenate([single_iou, multi_iou]),
        "low_res": np.concatenate([single_low, multi_low]),
    }


def _decoder_feed(embeddings, points, labels, orig_hw, resized_hw, mask_input=None) -> dict[str, np.ndarray]:
    """The runtime's decoder inputs (sam_transforms.prompt_inputs) keyed by the graph's input names."""
    low = embeddings.shape[-1] * 4
    prompt = prompt_inputs(points, labels, orig_hw, resized_hw, (low, low), mask_input)
    return dict(zip(DECODER_INPUTS, [embeddings, *prompt]))


def _export_sam_onnx_model(sam: Any, path: Path, opset: int, embedding_shape: tuple[int, ...]) -> None:
    """segment-anything's SamOnnxModel (all masks, no selection), exported as its own script does."""
    from segment_anything.utils.onnx import SamOnnxModel

    model = SamOnnxModel(sam, return_single_mask=False).eval()
    low = embedding_shape[-1] * 4
    size = sam.image_encoder.img_size
    dummy = (
        torch.randn(*embedding_shape),
        torch.randint(0, size, (1, 5, 2), dtype=torch.float),
        torch.randint(0, 4, (1, 5), dtype=torch.float),
        torch.randn(1, 1, low, low),
        torch.tensor([1.0]),
        torch.tensor([1500.0, 2250.0]),
    )
    names = list(DECODER_INPUTS) + ["orig_im_size"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # its int(prepadded_size) TracerWarning is the known crop bug
        torch.onnx.export(
            model, dummy, str(path), input_names=names, output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def compare_with_sam_onnx_model(
    sam: Any, decoder_path: Path, feeds: list[dict[str, np.ndarray]], opset: int, input_size: int
) -> dict[str, Any]:
    """Check 2 of the module docstring: the exported decoder vs segment-anything's SamOnnxModel on
    `feeds`; SamVerificationError below TRT_FRIENDLY_IOU or with a OneHot node."""
    import onnx

    ops = {node.op_type for node in onnx.load(str(decoder_path), load_external_data=False).graph.node}
    if "OneHot" in ops:
        raise SamVerificationError("the exported SAM decoder contains OneHot nodes (not TensorRT-friendly)")
    with tempfile.TemporaryDirectory(prefix="octopus-sam-ref-") as tmp:
        ref_path = Path(tmp) / "sam_onnx_model.onnx"
        _export_sam_onnx_model(sam, ref_path, opset, feeds[0]["image_embeddings"].shape)
        ref_ops = {node.op_type for node in onnx.load(str(ref_path)).graph.node}
        ours, ref = make_session(decoder_path), make_session(ref_path)
        worst_low, worst_up, worst_diff = 1.0, 1.0, 0.0
        for feed in feeds:
            low = ours.run(["low_res_masks"], feed)[0]
            ref_feed = {**feed, "orig_im_size": np.array([input_size, input_size], np.float32)}
            ref_low = ref.run(["low_res_masks"], ref_feed)[0]
            up, ref_up = (resize_bilinear(x[0], (input_size, input_size)) for x in (low, ref_low))
            worst_diff = max(worst_diff, float(np.abs(low - ref_low).max()))
            for m in range(low.shape[1]):
                worst_low = min(worst_low, mask_iou(low[0, m] > 0, ref_low[0, m] > 0))
                worst_up = min(worst_up, mask_iou(up[m] > 0, ref_up[m] > 0))
    result = {
        "min_iou_low_res": round(worst_low, 6),
        "min_iou_input_size": round(worst_up, 6),
        "max_abs_diff_low_res": worst_diff,
        "threshold": TRT_FRIENDLY_IOU,
        "cases": len(feeds),
        "reference_has_onehot": "OneHot" in ref_ops,
    }
    if min(worst_low, worst_up) < TRT_FRIENDLY_IOU:
        raise SamVerificationError(
            f"TensorRT-friendly SAM decoder differs from segment-anything's SamOnnxModel: mask IoU "
            f"{min(worst_low, worst_up):.4f} < {TRT_FRIENDLY_IOU}"
        )
    return result


def verify_sam(
    sam: Any,
    encoder_path: Path,
    decoder_path: Path,
    *,
    input_size: int,
    pixel_mean: list[float],
    pixel_std: list[float],
    precision: str,
    opset: int,
    log: Callable[[str], None] = lambda _line: None,
) -> SamVerification:
    """Run both checks; raise SamVerificationError with the worst case when a threshold is missed.

    `sam` is the fp32 PyTorch model (the reference for every precision). The PyTorch references
    are computed first so that onnxruntime's copies of the weights are loaded only afterwards.
    """
    from segment_anything import SamPredictor

    threshold = IOU_THRESHOLDS[precision]
    result = SamVerification(precision=precision, threshold=threshold)
    predictor = SamPredictor(sam)
    references = []
    with torch.no_grad():
        for h, w in verification_sizes(input_size):
            image = verification_image(h, w)
            predictor.set_image(image)
            per_prompt = [_reference_predictions(predictor, p) for p in _prompts(h, w)]
            # Iterative refinement: feed the best single-point low-res mask back as mask input.
            point = _prompts(h, w)[0]
            best = int(np.argmax(per_prompt[0]["iou"]))
            mask_in = per_prompt[0]["low_res"][best : best + 1]
            masks, iou, low = predictor.predict(point[1], point[2], mask_input=mask_in, multimask_output=True,
                                                return_logits=True)
            single, single_iou, _ = predictor.predict(point[1], point[2], mask_input=mask_in,
                                                      multimask_output=False, return_logits=True)
            refined = {"masks": np.concatenate([single, masks]), "iou": np.concatenate([single_iou, iou])}
            references.append(((h, w), image, per_prompt, (mask_in, refined)))
    predictor.reset_image()

    encoder, decoder = make_session(encoder_path), make_session(decoder_path)
    feeds = []
    for (h, w), image, per_prompt, (mask_in, refined) in references:
        pixels, resized = preprocess_image(image, input_size, pixel_mean, pixel_std)
        embeddings = encoder.run(["image_embeddings"], {"image": pixels})[0]
        cases = [(p, ref, None) for p, ref in zip(_prompts(h, w), per_prompt)]
        cases.append((("point+mask", *_prompts(h, w)[0][1:]), refined, mask_in[None]))
        for (name, points, labels), ref, mask_input in cases:
            feed = _decoder_feed(embeddings, points, labels, (h, w), resized, mask_input)
            feeds.append(feed)
            low_res, iou_pred = decoder.run(["low_res_masks", "iou_predictions"], feed)
            masks = postprocess_masks(low_res, input_size, resized, (h, w))
            ious = [mask_iou(masks[m] > 0, ref["masks"][m] > 0) for m in range(masks.shape[0])]
            case = {
                "size": [h, w], "prompt": name, "min_iou": round(min(ious), 6),
                "foreground": round(float((ref["masks"] > 0).mean()), 4),
                "iou_pred_max_abs_diff": float(np.abs(iou_pred[0] - ref["iou"]).max()),
            }
            result.cases.append(case)
            log(f"  sam parity {h}x{w} {name}: min mask IoU {case['min_iou']:.4f} (foreground {case['foreground']:.2f})")
            if min(ious) < threshold or not math.isfinite(min(ious)):
                raise SamVerificationError(
                    f"SAM {precision} export fails parity with SamPredictor at {h}x{w} ({name}): mask IoU "
                    f"{min(ious):.4f} < {threshold}"
                )
    result.trt_friendly = compare_with_sam_onnx_model(sam, decoder_path, feeds, opset, input_size)
    log(f"  TensorRT-friendly decoder vs SamOnnxModel: min IoU {result.trt_friendly['min_iou_low_res']:.4f}")
    return result

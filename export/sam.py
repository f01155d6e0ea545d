"""`octopus-rt export sam`: a Segment Anything checkpoint -> the bundle's verified `sam` section.

Writes `sam_encoder.onnx` (image -> image_embeddings) and `sam_decoder.onnx` (the TensorRT-friendly
prompt encoder + mask decoder, see export/sam_wrappers.py) into a staging folder of the bundle,
verifies them against segment-anything (export/sam_verify.py) and only then commits the section
(octopus_rt.bundle.commit_section), so an `lmm` section already in the bundle survives and a failed
or interrupted export leaves the bundle as it was. Field list: docs/bundle.md, `sam` section.

Exporter: torch.onnx's TorchScript exporter (`dynamo=False`). It honours `--opset` down to the
opsets older TensorRT / onnxruntime builds on Jetson need (the dynamo exporter writes opset >= 18),
traces these static-shape graphs in a fraction of a second, and the decoder's only dynamic axis
(number of points) is checked at other sizes by the verification.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from octopus_rt.bundle import commit_section, package_versions, staged_section
from octopus_rt.errors import InputError, OctopusError
from octopus_rt.export.onnx_export import check_opset_range, export_onnx
from octopus_rt.manifest import SamDecoderGraph, SamEncoderGraph, SamPreprocessSpec, SamSection, SamSource

from .sam_models import MODEL_TYPES, SamConfig, load_sam, load_sam_config
from .sam_verify import DECODER_INPUTS, verify_sam
from .sam_wrappers import SamDecoderWrapper, SamEncoderWrapper, layer_norm_scopes

__all__ = ["export_sam", "export_sam_graphs", "PRECISIONS", "DEFAULT_OPSET", "OPSET_RANGE"]

PRECISIONS = ("fp32", "fp16")
DEFAULT_OPSET = 17  # LayerNormalization is native from 17; TensorRT 8.6 (JetPack 5/6) parses it
OPSET_RANGE = (14, 20)
ENCODER_FILE = "sam_encoder.onnx"
DECODER_FILE = "sam_decoder.onnx"


def _encoder_to_fp16(model: Any, fragments: list[str]) -> Any:
    """fp32 encoder graph -> fp16 with every LayerNorm (nodes named by `fragments`) kept in fp32.

    Uses onnxruntime's own float16 converter; graph inputs and outputs stay float32. Converting the
    graph (rather than tracing a half-precision model) also avoids running fp16 matmuls on a CPU.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    names = [node.name for node in model.graph.node]
    blocked = [name for name in names if any(fragment in name for fragment in fragments)]
    lost = [fragment for fragment in fragments if not any(fragment in name for name in blocked)]
    if lost:
        raise OctopusError(f"fp16 export cannot locate the LayerNorm nodes of {', '.join(lost)} in the encoder graph")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about constants clamped to the fp16 range
        return convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked,
                                        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + ["LayerNormalization"])


def export_sam_graphs(sam: Any, config: SamConfig, staging: Path, precision: str,
                      opset: int) -> tuple[SamEncoderGraph, SamDecoderGraph]:
    """sam_encoder.onnx and sam_decoder.onnx of a segment-anything `Sam` into `staging`; returns the
    section's `encoder` and `decoder` entries. Not verified here (`export_sam` verifies)."""
    size, grid = config.image_size, config.embedding_size
    image = torch.zeros(1, 3, size, size)
    encoder = SamEncoderWrapper(sam)
    fragments = layer_norm_scopes(encoder)
    to_fp16 = (lambda model: _encoder_to_fp16(model, fragments)) if precision == "fp16" else None
    export_onnx(encoder, (image,), staging / ENCODER_FILE, opset=opset, exporter="torchscript", transform=to_fp16,
                input_names=["image"], output_names=["image_embeddings"])
    embeddings = torch.randn(1, config.prompt_embed_dim, grid, grid)
    low = 4 * grid
    # Trace with 3 points (not 2, the runtime's usual count) so no count is baked in as a constant.
    dummy = (embeddings, torch.rand(1, 3, 2) * size, torch.tensor([[1.0, 0.0, -1.0]]),
             torch.zeros(1, 1, low, low), torch.zeros(1))
    export_onnx(SamDecoderWrapper(sam).eval(), dummy, staging / DECODER_FILE, opset=opset, exporter="torchscript",
                input_names=list(DECODER_INPUTS), output_names=["low_res_masks", "iou_predictions"],
                dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})
    encoder_entry = SamEncoderGraph(
        file=ENCODER_FILE, input_names=["image"], output_names=["image_embeddings"], input_size=size,
        embedding_shape=[1, config.prompt_embed_dim, grid, grid],
        dtype="float16 (LayerNorm float32)" if precision == "fp16" else "float32", io_dtype="float32",
    )
    decoder_entry = SamDecoderGraph(
        file=DECODER_FILE, input_names=list(DECODER_INPUTS), output_names=["low_res_masks", "iou_predictions"],
        mask_input_size=[low, low], num_multimask_outputs=config.num_multimask_outputs, dtype="float32",
        tensorrt_friendly=True,
    )
    return encoder_entry, decoder_entry


def _check_args(model_type: str, precision: str, opset: int) -> None:
    if model_type not in MODEL_TYPES:
        raise InputError(f"unknown --model-type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if precision not in PRECISIONS:
        raise InputError(f"SAM export supports --precision {' or '.join(PRECISIONS)}, not {precision!r} "
                         "(int8/int4 apply to the LMM decoder only)")
    check_opset_range(opset, OPSET_RANGE, "SAM")


def export_sam(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_type: str,
    sam_config: SamConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    log: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Export, verify and commit the `sam` section of bundle `out_dir`; returns the committed section.

    checkpoint: a segment-anything state_dict (.pth). model_type: vit_b / vit_l / vit_h / custom.
    sam_config (custom only): SamConfig, dict, JSON string or JSON file; when None for custom, the
    file CHECKPOINT with suffix .json (written by `save_custom_checkpoint`) is used if present.
    Raises InputError for bad input and OctopusError (SamVerificationError) when parity fails;
    the bundle is then unchanged.
    """
    _check_args(model_type, precision, opset)
    checkpoint = Path(checkpoint).expanduser().resolve()
    out_dir = Path(out_dir).expanduser()
    config = None
    if model_type == "custom":
        if sam_config is None and checkpoint.with_suffix(".json").is_file():
            sam_config = checkpoint.with_suffix(".json")
        if sam_config is not None:
            config = sam_config if isinstance(sam_config, SamConfig) else load_sam_config(sam_config)
    elif sam_config is not None:
        raise InputError(f"--sam-config is only used with --model-type custom, not {model_type}")

    log(f"loading {model_type} checkpoint {checkpoint}")
    sam, config = load_sam(checkpoint, model_type, config)
    with staged_section(out_dir, "sam") as staging:
        log(f"exporting SAM graphs ({precision}, opset {opset}) to {staging}")
        encoder_entry, decoder_entry = export_sam_graphs(sam, config, staging, precision, opset)
        log("verifying against segment-anything (3 aspect ratios)")
        verification = verify_sam(
            sam, staging / ENCODER_FILE, staging / DECODER_FILE, input_size=config.image_size,
            pixel_mean=list(config.pixel_mean), pixel_std=list(config.pixel_std),
            precision=precision, opset=opset, log=log,
        )
        import onnx

        section = SamSection(
            source=SamSource(checkpoint=str(checkpoint), model_type=model_type,
                             config=config.to_dict() if model_type == "custom" else None),
            versions=package_versions("octopus-rt", "torch", "onnx", "onnxruntime", "segment-anything"),
            opset=opset,
            ir_version=onnx.load(str(staging / DECODER_FILE), load_external_data=False).ir_version,
            precision=precision,
            encoder=encoder_entry,
            decoder=decoder_entry,
            preprocess=SamPreprocessSpec(input_size=config.image_size, pixel_mean=list(config.pixel_mean),
                                         pixel_std=list(config.pixel_std), resize="longest_side", resample="bilinear"),
            mask_threshold=0.0,
            verification=verification.summary(),
        ).to_dict()
        manifest = commit_section(out_dir, "sam", staging, section)
    log(f"wrote sam section to {out_dir} (min mask IoU {verification.min_iou:.4f})")
    return manifest["sam"]

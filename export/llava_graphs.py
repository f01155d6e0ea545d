"""The LLaVA architecture in `export lmm`: which checkpoints are supported, how they load, and their
graphs (vision.onnx, decoder.onnx, traced from the wrappers of export/llava_wrappers.py).

Two transformers classes share this path (LLAVA_FAMILY): LlavaForConditionalGeneration (a CLIP /
SigLIP ViT tower, one hidden layer selected, CLS dropped or kept) and FastVlmForConditionalGeneration
(a timm CNN tower wrapped by `timm_wrapper`, whose last feature map, flattened row-major, is the image
tokens). Both have the same projector, language model, processor (LlavaProcessor) and bundle; they
differ in the class that loads them, the vision wrapper (llava_wrappers.vision_wrapper) and where the
input side comes from (a ViT config has `image_size`; a timm config has none, so the processor's is
used: `vision_input_size`).

A second architecture (Phi-3.5-Vision) gets a module of its own with the same four pieces:
`check_model_dir` (config.json only, no weights), `load_model`, `export_*_graphs(model, out_dir,
opset, form)` and `graph_specs(..., form)` (the manifest's typed `vision` / `decoder` entries);
export/lmm.py runs whichever the model directory calls for, and export/lmm_manifest.py builds the
section from the typed pieces.

Decoder forms (export/decoder_forms.py says which one to write): DECODER_EXPORTERS maps a form to
the function that writes it; `graph_specs` records the form (and its input / output names) in
`lmm.decoder`, where runtime/generate.make_decoder reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from octopus_rt.errors import InputError
from octopus_rt.export.onnx_export import export_onnx, one_line
from octopus_rt.jsonfile import read_json_object
from octopus_rt.manifest_lmm import DECODER_FORMS, DecoderGraph, VisionGraph

__all__ = [
    "SUPPORTED_TEXT_MODELS",
    "SUPPORTED_VISION_MODELS",
    "LLAVA_FAMILY",
    "VISION_FILE",
    "DECODER_FILE",
    "describe_supported",
    "check_model_dir",
    "model_class",
    "load_model",
    "export_llava_graphs",
    "export_flat_kv_decoder",
    "DECODER_EXPORTERS",
    "graph_specs",
    "vision_input_size",
]

SUPPORTED_TEXT_MODELS = ("phi3", "llama", "qwen2")
# LLaVA's towers (training/lora.py imports this name: what `octopus-rt train` takes).
SUPPORTED_VISION_MODELS = ("clip_vision_model", "siglip_vision_model")
# config.json model_type -> (architecture class name, supported vision_config.model_type values).
LLAVA_FAMILY: dict[str, tuple[str, tuple[str, ...]]] = {
    "llava": ("LlavaForConditionalGeneration", SUPPORTED_VISION_MODELS),
    "fast_vlm": ("FastVlmForConditionalGeneration", ("timm_wrapper",)),
}
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
# Tracing shapes; verification uses different ones (lmm_reference.DECODER_SHAPES, VISION_BATCHES).
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 5, 3


def describe_supported() -> str:
    towers = " or ".join(f"{name} (vision tower {'/'.join(vision)})" for name, vision in LLAVA_FAMILY.values())
    return f"{towers}, with a text model of type {'/'.join(SUPPORTED_TEXT_MODELS)}"


def check_model_dir(model_dir: Path) -> dict[str, Any]:
    """Validate MODEL_DIR without loading weights; returns config.json's content."""
    if not model_dir.exists():
        raise InputError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise InputError(f"model path is not a directory: {model_dir}")
    config = read_json_object(model_dir / "config.json",
                              missing=f"not a transformers model directory (no config.json): {model_dir}")
    architectures = config.get("architectures") or []
    text_type = (config.get("text_config") or {}).get("model_type")
    vision_config = config.get("vision_config") or {}
    vision_type = vision_config.get("model_type")
    family = LLAVA_FAMILY.get(config.get("model_type"))
    if family is None or family[0] not in architectures:
        shown = ", ".join(architectures) or config.get("model_type") or "unknown"
        raise InputError(f"unsupported architecture {shown} in {model_dir}; supported: {describe_supported()}")
    if text_type not in SUPPORTED_TEXT_MODELS or vision_type not in family[1]:
        raise InputError(
            f"unsupported {family[0]} parts (text {text_type}, vision {vision_type}) in {model_dir}; "
            f"supported: {describe_supported()}"
        )
    if (vision_config.get("model_args") or {}).get("features_only"):
        # A features_only timm network returns a list of feature maps, not one last_hidden_state.
        raise InputError(f"unsupported timm tower in {model_dir}: model_args.features_only is set; "
                         "FastVLM takes the network's last feature map")
    return config


def model_class(model_type: str):
    """The transformers class of a LLAVA_FAMILY model_type ("llava" or "fast_vlm")."""
    import transformers

    return getattr(transformers, LLAVA_FAMILY[model_type][0])


def load_model(model_dir: Path):
    """(LlavaForConditionalGeneration or FastVlmForConditionalGeneration in fp32 eval mode, its
    processor); InputError on a bad directory. Call check_model_dir first."""
    import torch
    from transformers import AutoProcessor

    model_type = read_json_object(model_dir / "config.json").get("model_type")
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad input directory
        raise InputError(f"cannot load the processor/tokenizer from {model_dir}: {one_line(exc)}") from exc
    try:
        model = model_class(model_type).from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt weights surface as many exception types
        raise InputError(f"cannot load model weights from {model_dir}: {one_line(exc)}") from exc
    return model.eval(), processor


def vision_input_size(model, processor) -> tuple[int, int]:
    """(height, width) of the pixel_values the processor makes: its crop size, else its fixed resize
    size, else the ViT config's `image_size` (a timm config has none: InputError then)."""
    cfg = processor.image_processor.to_dict()
    for key in ("crop_size", "size"):
        if key == "crop_size" and not cfg.get("do_center_crop"):
            continue
        value = cfg.get(key)
        if isinstance(value, dict) and value.get("height") and value.get("width"):
            return int(value["height"]), int(value["width"])
    side = getattr(model.config.vision_config, "image_size", None)
    if side is None:
        raise InputError("cannot tell the vision input size: the image processor has no fixed height/width "
                         "(size or crop_size) and the vision config no image_size")
    return int(side), int(side)


def export_llava_graphs(model, out_dir: Path, opset: int, form: str = "flat_kv", *,
                        image_size: tuple[int, int] | None = None) -> None:
    """vision.onnx and decoder.onnx (in decoder form `form`) of a LLAVA_FAMILY model into `out_dir`, in
    fp32 (docs/bundle.md, "Decoder graph I/O"; batch, sequence and past length dynamic). image_size:
    (height, width) of the vision input (vision_input_size; default: the vision config's image_size)."""
    import torch

    from octopus_rt.export.llava_wrappers import VISION_INPUT_NAMES, VISION_OUTPUT_NAMES, vision_wrapper

    if form not in DECODER_EXPORTERS:
        raise InputError(f"unknown decoder form {form!r}; choose one of {', '.join(DECODER_EXPORTERS)}")
    if image_size is None:
        side = model.config.vision_config.image_size
        image_size = (side, side)
    batch = torch.export.Dim("batch", min=1, max=1024)
    pixels = torch.zeros(TRACE_BATCH, 3, *image_size)
    export_onnx(
        vision_wrapper(model).eval(), (pixels,), out_dir / VISION_FILE,
        input_names=VISION_INPUT_NAMES, output_names=VISION_OUTPUT_NAMES,
        dynamic_shapes={"pixel_values": {0: batch}},
        dynamic_axes={"pixel_values": {0: "batch"}, "image_features": {0: "batch"}},
        opset=opset,
    )
    DECODER_EXPORTERS[form](model, out_dir / DECODER_FILE, opset)


def _export_llava_flat_kv(model, path: Path, opset: int) -> None:
    from octopus_rt.export.llava_wrappers import DecoderWrapper, decoder_dims

    export_flat_kv_decoder(DecoderWrapper(model).eval(), decoder_dims(model.config.get_text_config()), path, opset)


def _export_llava_gqa(model, path: Path, opset: int) -> None:
    from octopus_rt.export.decoder_graph import build_gqa_decoder

    build_gqa_decoder(model, path, opset=opset)


# form -> writer(model, path, opset); the forms' runtime contracts are in docs/bundle.md.
DECODER_EXPORTERS: dict[str, Callable[[Any, Path, int], None]] = {"flat_kv": _export_llava_flat_kv,
                                                                    "gqa": _export_llava_gqa}


def export_flat_kv_decoder(wrapper, dims, path: Path, opset: int) -> None:
    """Trace a flat_kv decoder module (llava_wrappers.DecoderWrapper's I/O) to `path`: batch, sequence
    and past length dynamic (docs/bundle.md, "Decoder graph I/O")."""
    import torch

    from octopus_rt.export.llava_wrappers import decoder_input_names, decoder_output_names

    batch = torch.export.Dim("batch", min=1, max=1024)
    # dynamic_shapes are keyed by argument name (dynamic_axes would be matched by position). Trace
    # with past > 0 and seq > 1 so no size-0/1 specialisation is baked in.
    seq = torch.export.Dim("sequence", min=1, max=dims.max_position_embeddings)
    past_len = torch.export.Dim("past_sequence", min=0, max=dims.max_position_embeddings)
    total = torch.export.Dim("total_sequence", min=1, max=2 * dims.max_position_embeddings)
    b, s, p = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    generator = torch.Generator().manual_seed(0)
    args = (
        torch.randn(b, s, dims.hidden_size, generator=generator),
        torch.ones(b, p + s, dtype=torch.long),
        torch.arange(p, p + s).expand(b, s).contiguous(),
        *[torch.randn(b, dims.num_key_value_heads, p, dims.head_dim, generator=generator) for _ in range(2 * dims.num_layers)],
    )
    dynamic = {
        "inputs_embeds": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_len} for _ in range(2 * dims.num_layers)),
    }
    inputs, outputs = decoder_input_names(dims.num_layers), decoder_output_names(dims.num_layers)
    axes = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
        **{name: {0: "batch", 2: "past_sequence"} for name in inputs[3:]},
        **{name: {0: "batch", 2: "total_sequence"} for name in outputs[1:]},
    }
    export_onnx(
        wrapper, args, path, input_names=inputs, output_names=outputs, dynamic_shapes=dynamic, dynamic_axes=axes,
        opset=opset,
    )


def graph_specs(model, num_image_tokens: int, vision_hidden: int, form: str = "flat_kv",
                form_reason: str | None = None, vision_precision: str | None = None) -> tuple[VisionGraph, DecoderGraph]:
    """The manifest entries of the two graphs `export_llava_graphs` writes (float32 I/O at every
    precision); the decoder's records its form (a quantised export adds its `quantization`), the
    vision graph's its precision when given (export lmm --vision-precision)."""
    from octopus_rt.export.decoder_graph import gqa_input_names, gqa_output_names
    from octopus_rt.export.llava_wrappers import (
        VISION_INPUT_NAMES,
        VISION_OUTPUT_NAMES,
        decoder_dims,
        decoder_input_names,
        decoder_output_names,
    )

    dims = decoder_dims(model.config.get_text_config())
    names = {"flat_kv": (decoder_input_names, decoder_output_names), "gqa": (gqa_input_names, gqa_output_names)}[form]
    vision = VisionGraph(file=VISION_FILE, input_names=list(VISION_INPUT_NAMES), output_names=list(VISION_OUTPUT_NAMES),
                         num_image_tokens=int(num_image_tokens), hidden_size=int(vision_hidden),
                         precision=vision_precision)
    decoder = DecoderGraph(
        file=DECODER_FILE, input_names=names[0](dims.num_layers), output_names=names[1](dims.num_layers),
        num_layers=dims.num_layers, num_key_value_heads=dims.num_key_value_heads, head_dim=dims.head_dim,
        hidden_size=dims.hidden_size, vocab_size=dims.vocab_size, max_position_embeddings=dims.max_position_embeddings,
        dtype="float32", form=form, kv_buffer=DECODER_FORMS[form], form_reason=form_reason,
    )
    return vision, decoder

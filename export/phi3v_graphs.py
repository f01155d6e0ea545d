"""The Phi-3(.5)-Vision architecture in `export lmm`: which checkpoints are supported, how they load,
and their graphs. The same four pieces as export/llava_graphs.py:

- `check_model_dir`: config.json (+ preprocessor_config.json) parsed by export/phi3v_config.py,
  safetensors shards and tokenizer.json present; no weights read;
- `load_model`: the native model (export/phi3v_model.py) streamed from the shards in float32, and the
  checkpoint's tokenizer (transformers' fast tokenizer straight from tokenizer.json: config.json's
  `auto_map` names remote code, which is never loaded);
- `export_phi3v_graphs`: vision.onnx (crops N x 3 x S x S, N dynamic -> per-crop projected tokens
  N x m^2 x H, export/phi3v_wrappers.Phi3VVisionWrapper), separators.npy (2 x H projected sub_GN /
  glb_GN) and decoder.onnx in the requested decoder form (DECODER_EXPORTERS);
- `graph_specs`: the manifest's typed `vision`, `decoder` and `hd` entries.

Decoder forms: "flat_kv" (docs/bundle.md, "Decoder graph I/O"; the Phi-3 decoder with the
checkpoint's longrope picked per call inside the graph). A second form (e.g. onnxruntime's
GroupQueryAttention with fused rotary) registers its exporter in DECODER_EXPORTERS; graph_specs records
the form in `lmm.decoder.form` and the runtime reads it from there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from octopus_rt.errors import InputError
from octopus_rt.jsonfile import read_json_object
from octopus_rt.export.onnx_export import export_onnx, one_line
from octopus_rt.manifest_lmm import DecoderGraph, HDSeparators, HDTransformSpec, VisionGraph

__all__ = [
    "VISION_FILE",
    "DECODER_FILE",
    "SEPARATORS_FILE",
    "DECODER_EXPORTERS",
    "describe_supported",
    "check_model_dir",
    "load_model",
    "export_phi3v_graphs",
    "graph_specs",
    "max_image_tokens",
]

VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
SEPARATORS_FILE = "separators.npy"
TRACE_CROPS = 3  # the vision graph is traced with 3 crops and verified with others


def describe_supported() -> str:
    return "Phi3VForCausalLM (Phi-3 / Phi-3.5-Vision, official layout: embd_layer sub_glb HD, CLIP img_processor, safetensors)"


def check_model_dir(model_dir: Path, num_crops: int | None = None) -> dict[str, Any]:
    """Validate an official-layout Phi-3-Vision directory without loading weights; returns config.json."""
    from octopus_rt.export.phi3v_checkpoint import checkpoint_shards
    from octopus_rt.export.phi3v_config import read_phi3v_spec

    read_phi3v_spec(model_dir, num_crops=num_crops)
    checkpoint_shards(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"no tokenizer.json in {model_dir}; the Phi-3-Vision checkpoint's tokenizer files are needed")
    return read_json_object(model_dir / "config.json")


def load_model(model_dir: Path, num_crops: int | None = None):
    """(Phi3VForCausalLM in float32 eval mode, the checkpoint's transformers fast tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from octopus_rt.export.phi3v_checkpoint import load_phi3v

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad input directory
        raise InputError(f"cannot load the tokenizer from {model_dir}: {one_line(exc)}") from exc
    return load_phi3v(model_dir, num_crops=num_crops), tokenizer


def _export_flat_kv(model, path: Path, opset: int) -> None:
    from octopus_rt.export.llava_graphs import export_flat_kv_decoder
    from octopus_rt.export.llava_wrappers import decoder_dims
    from octopus_rt.export.phi3v_wrappers import Phi3VDecoderWrapper

    export_flat_kv_decoder(Phi3VDecoderWrapper(model).eval(), decoder_dims(model.config), path, opset)


# form -> exporter(model, path, opset); the form's runtime contract is documented in docs/bundle.md.
DECODER_EXPORTERS: dict[str, Callable[[Any, Path, int], None]] = {"flat_kv": _export_flat_kv}


def export_phi3v_graphs(model, out_dir: Path, opset: int, form: str = "flat_kv") -> None:
    """vision.onnx, separators.npy and decoder.onnx of a Phi3VForCausalLM into `out_dir`, in float32."""
    import torch

    from octopus_rt.export.phi3v_wrappers import (
        VISION_INPUT_NAMES,
        VISION_OUTPUT_NAMES,
        Phi3VVisionWrapper,
        projected_separators,
    )

    if form not in DECODER_EXPORTERS:
        raise InputError(f"unknown decoder form {form!r}; choose one of {', '.join(DECODER_EXPORTERS)}")
    side = model.spec.crop_size
    crops = torch.export.Dim("crops", min=1, max=1024)
    export_onnx(
        Phi3VVisionWrapper(model).eval(), (torch.zeros(TRACE_CROPS, 3, side, side),), out_dir / VISION_FILE,
        input_names=VISION_INPUT_NAMES, output_names=VISION_OUTPUT_NAMES,
        dynamic_shapes={"pixel_values": {0: crops}},
        dynamic_axes={"pixel_values": {0: "crops"}, VISION_OUTPUT_NAMES[0]: {0: "crops"}},
        opset=opset,
    )
    np.save(out_dir / SEPARATORS_FILE, projected_separators(model).numpy().astype(np.float32))
    DECODER_EXPORTERS[form](model, out_dir / DECODER_FILE, opset)


def max_image_tokens(num_crops: int, tokens_per_side: int) -> int:
    """The most image tokens one image can get at num_crops: over every crop grid rows x cols with
    rows * cols <= num_crops, ((rows cols) + 1) m^2 + 1 + (rows + 1) m (a 1-column portrait grid wins)."""
    m = tokens_per_side
    return max((r * c + 1) * m * m + 1 + (r + 1) * m
               for r in range(1, num_crops + 1) for c in range(1, num_crops // r + 1))


def graph_specs(model, num_crops: int, form: str = "flat_kv") -> tuple[VisionGraph, DecoderGraph, HDTransformSpec]:
    """The manifest entries of what `export_phi3v_graphs` writes (float32 I/O at every precision)."""
    from octopus_rt.export.llava_wrappers import decoder_dims, decoder_input_names, decoder_output_names
    from octopus_rt.export.phi3v_wrappers import VISION_INPUT_NAMES, VISION_OUTPUT_NAMES, rope_switch_length

    spec = model.spec
    dims = decoder_dims(model.config)
    vision = VisionGraph(
        file=VISION_FILE, input_names=list(VISION_INPUT_NAMES), output_names=list(VISION_OUTPUT_NAMES),
        num_image_tokens=max_image_tokens(num_crops, spec.tokens_per_side), hidden_size=dims.hidden_size,
    )
    decoder = DecoderGraph(
        file=DECODER_FILE, input_names=decoder_input_names(dims.num_layers),
        output_names=decoder_output_names(dims.num_layers), num_layers=dims.num_layers,
        num_key_value_heads=dims.num_key_value_heads, head_dim=dims.head_dim, hidden_size=dims.hidden_size,
        vocab_size=dims.vocab_size, max_position_embeddings=dims.max_position_embeddings, dtype="float32",
        form=form, original_max_position_embeddings=rope_switch_length(model.config),
    )
    hd = HDTransformSpec(
        num_crops=int(num_crops), separators=HDSeparators(file=SEPARATORS_FILE, dtype="float32"),
        crop_size=spec.crop_size, tokens_per_side=spec.tokens_per_side,
    )
    return vision, decoder, hd

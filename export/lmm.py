"""`export_lmm`: a LLaVA-style transformers checkpoint -> the verified `lmm` section of a model bundle.

Steps (each failure is a one-line OctopusError and leaves no new bundle section behind):

1. validate MODEL_DIR (exists, is a transformers dir, a supported LlavaForConditionalGeneration);
2. load model (fp32, CPU, eval) and processor; compute the PyTorch reference (lmm_reference);
3. stage a section folder in the bundle; write tokenizer.json, embed_tokens.npy and, with
   torch.onnx.export (dynamo, `dynamic_shapes` keyed by argument name), vision.onnx and decoder.onnx
   in fp32; free the PyTorch model;
4. convert to the requested precision (quantize.py);
5. verify in onnxruntime at shapes other than the tracing shapes (lmm_verify), and check that the
   pre-rendered prompt strings tokenize exactly as the processor does;
6. commit the section (manifest swap is atomic; see octopus_rt.bundle).

Why not optimum: optimum-onnx 0.1 pins transformers < 4.58 and has no LLaVA exporter; the wrappers
in llava_wrappers.py are a few lines and match generate() token for token.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from octopus_rt import bundle, vocab
from octopus_rt.errors import InputError, OctopusError
from octopus_rt.export.onnx_export import check_opset_range, export_onnx, one_line

__all__ = ["SUPPORTED_TEXT_MODELS", "SUPPORTED_VISION_MODELS", "DEFAULT_OPSET", "export_lmm", "describe_supported"]

SUPPORTED_TEXT_MODELS = ("phi3", "llama", "qwen2")
SUPPORTED_VISION_MODELS = ("clip_vision_model", "siglip_vision_model")
DEFAULT_OPSET = 18
_OPSET_RANGE = (14, 23)
# Tracing shapes; verification uses different ones (lmm_reference.DECODER_SHAPES, VISION_BATCHES).
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 5, 3
# The chat template is rendered around this text to split it into prefix / infix / suffix strings.
_SENTINEL = "QUESTIONSENTINEL"
# Closed-set words are tokenized after this anchor, so each form gets its in-context ids.
_ANCHOR = "\n"
_GENERATION_STEPS = 32


def describe_supported() -> str:
    return (
        "LlavaForConditionalGeneration with a text model of type "
        + "/".join(SUPPORTED_TEXT_MODELS)
        + " and a vision tower of type "
        + "/".join(SUPPORTED_VISION_MODELS)
    )


def _noop(_: str) -> None:
    pass


def _check_model_dir(model_dir: Path) -> dict[str, Any]:
    """Validate MODEL_DIR without loading weights; returns config.json's content."""
    if not model_dir.exists():
        raise InputError(f"model directory not found: {model_dir}")
    if not model_dir.is_dir():
        raise InputError(f"model path is not a directory: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"not a transformers model directory (no config.json): {model_dir}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable config.json in {model_dir}: {exc}") from exc
    architectures = config.get("architectures") or []
    text_type = (config.get("text_config") or {}).get("model_type")
    vision_type = (config.get("vision_config") or {}).get("model_type")
    if config.get("model_type") != "llava" or "LlavaForConditionalGeneration" not in architectures:
        shown = ", ".join(architectures) or config.get("model_type") or "unknown"
        raise InputError(f"unsupported architecture {shown} in {model_dir}; supported: {describe_supported()}")
    if text_type not in SUPPORTED_TEXT_MODELS or vision_type not in SUPPORTED_VISION_MODELS:
        raise InputError(
            f"unsupported LLaVA parts (text {text_type}, vision {vision_type}) in {model_dir}; "
            f"supported: {describe_supported()}"
        )
    return config


def _load(model_dir: Path):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad input directory
        raise InputError(f"cannot load the processor/tokenizer from {model_dir}: {one_line(exc)}") from exc
    try:
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt weights surface as many exception types
        raise InputError(f"cannot load model weights from {model_dir}: {one_line(exc)}") from exc
    return model.eval(), processor


def export_llava_graphs(model, staging: Path, opset: int) -> None:
    """vision.onnx and decoder.onnx of a LlavaForConditionalGeneration into `staging`, in fp32."""
    import torch

    from octopus_rt.export.llava_wrappers import (
        VISION_INPUT_NAMES,
        VISION_OUTPUT_NAMES,
        DecoderWrapper,
        VisionWrapper,
        decoder_dims,
        decoder_input_names,
        decoder_output_names,
    )

    vision_cfg = model.config.vision_config
    dims = decoder_dims(model.config.get_text_config())
    batch = torch.export.Dim("batch", min=1, max=1024)
    pixels = torch.zeros(_TRACE_BATCH, 3, vision_cfg.image_size, vision_cfg.image_size)
    export_onnx(
        VisionWrapper(model).eval(), (pixels,), staging / "vision.onnx",
        input_names=VISION_INPUT_NAMES, output_names=VISION_OUTPUT_NAMES,
        dynamic_shapes={"pixel_values": {0: batch}},
        dynamic_axes={"pixel_values": {0: "batch"}, "image_features": {0: "batch"}},
        opset=opset,
    )

    # dynamic_shapes are keyed by argument name (dynamic_axes would be matched by position). Trace
    # with past > 0 and seq > 1 so no size-0/1 specialisation is baked in.
    seq = torch.export.Dim("sequence", min=1, max=dims.max_position_embeddings)
    past_len = torch.export.Dim("past_sequence", min=0, max=dims.max_position_embeddings)
    total = torch.export.Dim("total_sequence", min=1, max=2 * dims.max_position_embeddings)
    b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
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
        DecoderWrapper(model).eval(), args, staging / "decoder.onnx",
        input_names=inputs, output_names=outputs, dynamic_shapes=dynamic, dynamic_axes=axes, opset=opset,
    )


def _preprocess_section(processor, model) -> dict[str, Any]:
    from transformers.image_utils import PILImageResampling

    image_processor = processor.image_processor
    cfg = image_processor.to_dict()
    backend = getattr(image_processor, "backend", None)
    if backend is None:
        backend = "torchvision" if "Torchvision" in "".join(c.__name__ for c in type(image_processor).__mro__) else "pil"

    def plain_size(value):
        if value is None:
            return None
        items = dict(value.items()) if hasattr(value, "items") else {"shortest_edge": int(value)}
        return {k: int(v) for k, v in items.items() if v is not None}

    resample = cfg.get("resample")
    try:
        resample_name = PILImageResampling(int(resample)).name.lower() if resample is not None else None
    except (TypeError, ValueError):
        resample_name = str(resample)
    do_crop = bool(cfg.get("do_center_crop", False))
    crop = plain_size(cfg.get("crop_size")) if do_crop else None
    size = plain_size(cfg.get("size"))
    side = model.config.vision_config.image_size
    if crop:
        height, width = crop["height"], crop["width"]
    elif size and "height" in size:
        height, width = size["height"], size["width"]
    else:
        height = width = side
    return {
        "image_processor_type": type(image_processor).__name__,
        "backend": str(backend),
        "do_convert_rgb": bool(cfg.get("do_convert_rgb", True)),
        "do_resize": bool(cfg.get("do_resize", True)),
        "size": size,
        "resample": resample_name,
        "do_center_crop": do_crop,
        "crop_size": crop,
        "do_rescale": bool(cfg.get("do_rescale", True)),
        "rescale_factor": float(cfg.get("rescale_factor", 1 / 255)),
        "do_normalize": bool(cfg.get("do_normalize", True)),
        "image_mean": [float(v) for v in cfg.get("image_mean", (0.0, 0.0, 0.0))],
        "image_std": [float(v) for v in cfg.get("image_std", (1.0, 1.0, 1.0))],
        "input_height": int(height),
        "input_width": int(width),
    }


def _prompt_section(processor, image_token_id: int, num_image_tokens: int) -> dict[str, Any]:
    from octopus_rt.export.lmm_reference import build_messages

    if not getattr(processor, "chat_template", None):
        raise InputError("the model's processor has no chat template; save one with the processor (chat_template.jinja)")
    rendered = processor.apply_chat_template(build_messages(_SENTINEL), add_generation_prompt=True, tokenize=False)
    image_token = processor.image_token
    if rendered.count(image_token) != 1 or rendered.count(_SENTINEL) != 1:
        raise OctopusError(f"the chat template does not render one image token {image_token!r} and one question")
    prefix, rest = rendered.split(image_token)
    infix, suffix = rest.split(_SENTINEL)
    bos = processor.tokenizer.bos_token
    # The processor's rule: no special tokens are added when the template already wrote the BOS text.
    add_special = not (bos is not None and rendered.startswith(bos))
    return {
        "prefix": prefix,
        "image_token": image_token,
        "image_token_id": int(image_token_id),
        "num_image_tokens": int(num_image_tokens),
        "infix": infix,
        "suffix": suffix,
        "add_special_tokens": add_special,
    }


def _check_prompt(prompt: dict[str, Any], tokenizer_json: Path, processor) -> None:
    """The runtime's tokenisation of the pre-rendered strings must equal the processor's input_ids."""
    from tokenizers import Tokenizer

    from octopus_rt.export.lmm_reference import QUESTIONS, processor_inputs, synthetic_images

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    images = synthetic_images(1)
    for question in (*QUESTIONS, vocab.format_mcq_question("Is it blurry?", ["Yes", "No"])):
        expected = processor_inputs(processor, [question], images)["input_ids"][0].tolist()
        text = (
            prompt["prefix"] + prompt["image_token"] * prompt["num_image_tokens"] + prompt["infix"] + question + prompt["suffix"]
        )
        got = tokenizer.encode(text, add_special_tokens=prompt["add_special_tokens"]).ids
        if got != expected:
            raise OctopusError(
                f"pre-rendered prompt does not tokenize like the processor for {question!r} "
                f"({len(got)} vs {len(expected)} ids)"
            )


def _closed_set(tokenizer_json: Path, progress: Callable[[str], None]) -> tuple[dict, dict]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False).ids
    closed: dict[str, list[int]] = {}
    forms_out: dict[str, dict[str, list[int]]] = {}
    multi: list[str] = []
    for words in vocab.closed_set_words().values():
        for word in words:
            ids_by_form: dict[str, list[int]] = {}
            for form in vocab.word_forms(word):
                ids = tokenizer.encode(_ANCHOR + form, add_special_tokens=False).ids
                # In-context ids (after a newline); a standalone encode would let sentencepiece-style
                # tokenizers prepend a space marker to the space-less form.
                ids = ids[len(anchor):] if ids[: len(anchor)] == anchor else tokenizer.encode(form, add_special_tokens=False).ids
                ids_by_form[form] = ids
            forms_out[word] = ids_by_form
            # A multi-token form's first sub-token ("l" of "left") is shared with unrelated words and
            # would add their probability mass to this word: use single-token forms, and fall back to
            # first sub-tokens only for a word that has no single-token form at all (docs/bundle.md).
            single = [ids[0] for ids in ids_by_form.values() if len(ids) == 1]
            if single:
                closed[word] = list(dict.fromkeys(single))
            else:
                closed[word] = list(dict.fromkeys(ids[0] for ids in ids_by_form.values() if ids))
                multi.append(word)
    if multi:
        progress(f"closed set: no single-token form for {', '.join(multi)}; using first sub-tokens")
    return closed, forms_out


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def export_lmm(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export MODEL_DIR into bundle OUT_DIR's `lmm` section and return that section (manifest dict).

    Raises InputError for bad input and OctopusError when verification fails; in both cases no
    new section is committed and the staging folder is removed.
    """
    from octopus_rt.export.quantize import PRECISIONS

    progress = progress or _noop
    model_dir = Path(model_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser()
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    check_opset_range(opset, _OPSET_RANGE, "export lmm")
    config_json = _check_model_dir(model_dir)
    progress(f"loading {model_dir}")
    # The model travels in a one-element list that _export_into empties, so that the last reference
    # to the PyTorch weights is dropped before onnxruntime loads the graphs.
    holder = list(_load(model_dir))
    with bundle.staged_section(out_dir, "lmm") as staging:
        section = _export_into(holder, model_dir, config_json, staging, precision, int(opset), progress)
        manifest = bundle.commit_section(out_dir, "lmm", staging, section)
    progress(f"committed lmm section {manifest['lmm']['dir']} into {out_dir}")
    return manifest["lmm"]


def _export_into(holder, model_dir, config_json, staging, precision, opset, progress) -> dict[str, Any]:
    """Write, convert and verify the section's files in `staging`; returns the section dict.

    `holder` is [model, processor]; the model is removed from it (and freed) after the ONNX export.
    Autograd is switched off only inside torch.no_grad() blocks, never globally: the exporter runs
    in-process next to training code (`octopus-rt train` exports after merging).
    """
    import onnx

    from octopus_rt.export import quantize
    from octopus_rt.export.llava_wrappers import decoder_dims, decoder_input_names, decoder_output_names
    from octopus_rt.export.lmm_reference import compute_reference
    from octopus_rt.export.lmm_verify import verify_lmm

    processor = holder[1]
    model = holder[0]
    holder[0] = None
    text_cfg = model.config.get_text_config()
    dims = decoder_dims(text_cfg)
    image_token_id = int(model.config.image_token_id)
    num_params = int(sum(p.numel() for p in model.parameters()))
    eos_ids = _eos_ids(model, processor.tokenizer)

    progress(f"computing the PyTorch reference ({_GENERATION_STEPS} greedy steps, batch 2, left padding)")
    reference = compute_reference(model, processor, steps=_GENERATION_STEPS)
    num_image_tokens = int(reference.vision[0].features.shape[1])
    vision_hidden = int(reference.vision[0].features.shape[2])

    tokenizer_json = staging / "tokenizer.json"
    processor.tokenizer.backend_tokenizer.save(str(tokenizer_json))
    prompt = _prompt_section(processor, image_token_id, num_image_tokens)
    _check_prompt(prompt, tokenizer_json, processor)
    closed, closed_forms = _closed_set(tokenizer_json, progress)
    preprocess = _preprocess_section(processor, model)

    embed = model.get_input_embeddings().weight.detach().float().numpy()
    embed_dtype = np.float16 if precision == "fp16" else np.float32
    np.save(staging / "embed_tokens.npy", embed.astype(embed_dtype))

    progress(f"exporting vision.onnx and decoder.onnx (opset {opset}, fp32)")
    fp32_dir = staging / ".fp32" if precision != "fp32" else staging
    fp32_dir.mkdir(exist_ok=True)
    export_llava_graphs(model, fp32_dir, opset)
    # The reference and the exported graphs are all we need from PyTorch: free the model before
    # any onnxruntime session (or quantizer) allocates its own copy of the weights.
    model_cfg_vision = model.config.vision_config.model_type
    del model
    gc.collect()

    if precision != "fp32":
        progress(f"converting to {precision}")
        convert = {"fp16": quantize.to_fp16, "int8": quantize.to_int8, "int4": quantize.to_int4}[precision]
        # int4 is weight-only quantisation of the decoder's MatMuls; the small vision tower stays fp32.
        vision_convert = quantize.to_int8 if precision == "int8" else (quantize.to_fp16 if precision == "fp16" else None)
        if vision_convert is None:
            for path in fp32_dir.glob("vision.onnx*"):  # the graph and its external data, if any
                shutil.copy(path, staging / path.name)
        else:
            vision_convert(fp32_dir / "vision.onnx", staging / "vision.onnx")
        convert(fp32_dir / "decoder.onnx", staging / "decoder.onnx")
        shutil.rmtree(fp32_dir)

    progress(f"verifying in onnxruntime ({precision})")
    embed_for_check = np.load(staging / "embed_tokens.npy", mmap_mode="r")
    report = verify_lmm(reference, staging / "vision.onnx", staging / "decoder.onnx", embed_for_check, dims, image_token_id, precision)
    progress(
        f"verified {precision}: vision max|diff| {report.vision_max_abs_diff:.2e}, decoder max|diff| "
        f"{report.decoder_max_abs_diff:.2e} at {len(reference.decoder)} shapes, {report.steps} steps: "
        f"logits max|diff| {report.generation_max_abs_diff:.2e}, min cosine {report.generation_min_cosine:.6f}, "
        f"top-1 {report.top1_agreement:.3f}, greedy tokens identical: {report.tokens_identical}"
    )
    if report.failures:
        raise OctopusError(f"{precision} export failed verification: " + "; ".join(report.failures))

    graph = onnx.load(str(staging / "decoder.onnx"), load_external_data=False)
    return {
        "versions": bundle.package_versions(
            "octopus-rt", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "tokenizers"
        ),
        "opset": opset,
        "ir_version": int(graph.ir_version),
        "precision": precision,
        "source": {
            "model_dir": str(model_dir),
            "architectures": list(config_json.get("architectures") or []),
            "text_model_type": text_cfg.model_type,
            "vision_model_type": model_cfg_vision,
            "num_parameters": num_params,
        },
        "vision": {
            "file": "vision.onnx",
            "input_names": ["pixel_values"],
            "output_names": ["image_features"],
            "num_image_tokens": num_image_tokens,
            "hidden_size": vision_hidden,
        },
        "embedding": {
            "file": "embed_tokens.npy",
            "vocab_size": int(embed.shape[0]),
            "hidden_size": int(embed.shape[1]),
            "dtype": np.dtype(embed_dtype).name,
        },
        "decoder": {
            "file": "decoder.onnx",
            "input_names": decoder_input_names(dims.num_layers),
            "output_names": decoder_output_names(dims.num_layers),
            "num_layers": dims.num_layers,
            "num_key_value_heads": dims.num_key_value_heads,
            "head_dim": dims.head_dim,
            "hidden_size": dims.hidden_size,
            "vocab_size": dims.vocab_size,
            "max_position_embeddings": dims.max_position_embeddings,
            "dtype": "float32",
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "bos_token_id": processor.tokenizer.bos_token_id,
            "eos_token_ids": eos_ids,
            "pad_token_id": processor.tokenizer.pad_token_id,
        },
        "preprocess": preprocess,
        "prompt": prompt,
        "closed_set": closed,
        "closed_set_forms": closed_forms,
        "whole_image_phrases": list(vocab.WHOLE_IMAGE_PHRASES),
        "score_prompt": {"question": vocab.SCORE_QUESTION, "answer_prefix": vocab.SCORE_ANSWER_PREFIX},
        "verification": report.summary(),
    }

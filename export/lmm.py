"""`export_lmm`: a LLaVA-style transformers checkpoint or an official-layout Phi-3(.5)-Vision
checkpoint -> the verified `lmm` section of a model bundle.

The architecture comes from MODEL_DIR/config.json: `Phi3VForCausalLM` / `phi3_v` runs the
Phi-3-Vision steps (export/phi3v_lmm.py, graphs in export/phi3v_graphs.py); anything else must be a
supported LLaVA, whose steps follow.

Steps (each failure is a one-line OctopusError and leaves no new bundle section behind):

1. validate MODEL_DIR (exists, is a transformers dir, a supported LlavaForConditionalGeneration or
   FastVlmForConditionalGeneration: export/llava_graphs.LLAVA_FAMILY);
2. load model (fp32, CPU, eval) and processor; compute the PyTorch reference (lmm_reference);
3. stage a section folder in the bundle; write tokenizer.json, embed_tokens.npy and, in fp32,
   vision.onnx (torch.onnx.export, export/onnx_export.py) and decoder.onnx in the decoder form
   export/decoder_forms.resolve_form picks (traced flat_kv, or the gqa graph of
   export/decoder_graph.py); free the model;
4. convert to the requested precision (quantize.py; the recipe is recorded in `decoder.quantization`),
   the vision graph to its own precision (`vision_precision`, default the export's; int4: fp32),
   recorded in `vision.precision`;
5. verify in onnxruntime at shapes other than the tracing shapes (lmm_verify; the user may lower
   the quantised agreement thresholds or accept a loss, which the section's `verification` records),
   and check that the pre-rendered prompt strings tokenize exactly as the processor does;
6. commit the section (manifest swap is atomic; see octopus_rt.bundle).

Who does what: this module runs the steps; export/llava_graphs.py knows the architecture (supported
configs, loading, graph export, the graphs' manifest entries); export/lmm_manifest.py builds the
rest of the section as typed pieces of octopus_rt/manifest_lmm.py. Phi-3-Vision has its own graphs
module (export/phi3v_graphs.py, the same four pieces) and steps (export/phi3v_lmm.py), chosen in
`export_lmm` from config.json; both share `write_embedding`, `convert_graphs` and the commit.

Why not optimum: optimum-onnx 0.1 pins transformers < 4.58 and has no LLaVA exporter; the wrappers
in llava_wrappers.py are a few lines and match generate() token for token.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from octopus_rt import bundle
from octopus_rt.errors import InputError
from octopus_rt.export.llava_graphs import (
    SUPPORTED_TEXT_MODELS,
    SUPPORTED_VISION_MODELS,
    check_model_dir,
    describe_supported,
    export_llava_graphs,
    graph_specs,
    load_model,
)
from octopus_rt.export.onnx_export import check_opset_range
from octopus_rt.manifest_lmm import EmbeddingTable, LmmSource, TokenizerSpec
from octopus_rt.verification import LmmVerification

__all__ = [
    "SUPPORTED_TEXT_MODELS",
    "SUPPORTED_VISION_MODELS",
    "DEFAULT_OPSET",
    "EMBEDDING_FILE",
    "TOKENIZER_FILE",
    "export_lmm",
    "describe_supported",
    "write_embedding",
    "convert_graphs",
]

DEFAULT_OPSET = 18
_OPSET_RANGE = (14, 23)
_GENERATION_STEPS = 32
EMBEDDING_FILE = "embed_tokens.npy"
TOKENIZER_FILE = "tokenizer.json"


def _noop(_: str) -> None:
    pass


def export_lmm(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    progress: Callable[[str], None] | None = None,
    num_crops: int | None = None,
    decoder_form: str = "auto",
    min_cosine: float | None = None,
    min_top1: float | None = None,
    accept_quality_loss: bool = False,
    vision_precision: str | None = None,
) -> dict[str, Any]:
    """Export MODEL_DIR into bundle OUT_DIR's `lmm` section and return that section (manifest dict).

    vision_precision: LLaVA family only, "fp32" | "fp16" | "int8" for the vision graph (default: the
    export's precision, fp32 for int4), e.g. an fp16 vision graph next to an fp32 decoder to halve a
    CNN tower's bytes. A graph below fp32 anywhere makes the quantised criteria apply
    (lmm_verify.judged_precision).

    num_crops: Phi-3-Vision only, the HD crop budget recorded in the bundle (default: the
    checkpoint's preprocessor_config.json, else 4). decoder_form: "auto" | "flat_kv" | "gqa"
    (export/decoder_forms.py; Phi-3-Vision: flat_kv). min_cosine / min_top1 /
    accept_quality_loss: the user's verification overrides for quantised precisions (recorded in the
    section's `verification`). Raises InputError for bad input and OctopusError when verification
    fails; in both cases no new section is committed and the staging folder is removed.
    """
    from octopus_rt.export.decoder_forms import FORM_CHOICES
    from octopus_rt.export.lmm_verify import judged_precision, user_limits
    from octopus_rt.export.quantize import PRECISIONS, VISION_PRECISIONS, default_vision_precision

    progress = progress or _noop
    model_dir = Path(model_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser()
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if decoder_form not in FORM_CHOICES:
        raise InputError(f"unknown decoder form {decoder_form!r}; choose one of {', '.join(FORM_CHOICES)}")
    if vision_precision is not None and vision_precision not in VISION_PRECISIONS:
        raise InputError(f"unknown vision precision {vision_precision!r}; choose one of {', '.join(VISION_PRECISIONS)}")
    check_opset_range(opset, _OPSET_RANGE, "export lmm")
    phi3v = _is_phi3v(model_dir)
    if phi3v and vision_precision is not None:
        raise InputError("--vision-precision applies to LLaVA-family models only (Phi-3-Vision's vision graph "
                         "follows --precision)")
    vision_precision = vision_precision or default_vision_precision(precision)
    try:
        checks = user_limits(judged_precision(precision, vision_precision), min_cosine, min_top1, accept_quality_loss)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if phi3v:
        return _export_phi3v(model_dir, out_dir, precision, int(opset), progress, num_crops, decoder_form, checks)
    if num_crops is not None:
        raise InputError("--num-crops applies to Phi-3-Vision checkpoints only")
    config_json = check_model_dir(model_dir)
    progress(f"loading {model_dir}")
    # The model travels in a one-element list that _export_into empties, so that the last reference
    # to the PyTorch weights is dropped before onnxruntime loads the graphs.
    holder = list(load_model(model_dir))
    with bundle.staged_section(out_dir, "lmm") as staging:
        section = _export_into(holder, model_dir, config_json, staging, precision, int(opset), progress,
                               decoder_form, checks, vision_precision)
        manifest = bundle.commit_section(out_dir, "lmm", staging, section)
    progress(f"committed lmm section {manifest['lmm']['dir']} into {out_dir}")
    return manifest["lmm"]


def _is_phi3v(model_dir: Path) -> bool:
    """config.json names Phi3VForCausalLM / phi3_v (an unreadable one is left to the LLaVA checks)."""
    from octopus_rt.export.phi3v_config import is_phi3v_config
    from octopus_rt.jsonfile import read_json_object

    try:
        return is_phi3v_config(read_json_object(model_dir / "config.json"))
    except InputError:
        return False


def _export_phi3v(model_dir: Path, out_dir: Path, precision: str, opset: int, progress, num_crops, decoder_form,
                  checks) -> dict[str, Any]:
    from octopus_rt.export import phi3v_graphs
    from octopus_rt.export.phi3v_lmm import export_phi3v_into

    if decoder_form == "gqa":
        # The runtime's cache re-run at the longrope switch exists for flat_kv states only (docs/phi3v.md,
        # "The longrope switch"); auto therefore means flat_kv for Phi-3-Vision.
        raise InputError("the gqa decoder form is not available for Phi-3-Vision (its longrope switch needs the "
                         "flat_kv decoder's cache re-run); use --decoder-form auto or flat_kv")
    config_json = phi3v_graphs.check_model_dir(model_dir, num_crops)
    progress(f"loading {model_dir} (Phi-3-Vision, streaming the safetensors shards)")
    holder = list(phi3v_graphs.load_model(model_dir, num_crops))
    with bundle.staged_section(out_dir, "lmm") as staging:
        section = export_phi3v_into(holder, model_dir, config_json, staging, precision, opset, progress, checks=checks)
        manifest = bundle.commit_section(out_dir, "lmm", staging, section)
    progress(f"committed lmm section {manifest['lmm']['dir']} into {out_dir}")
    return manifest["lmm"]


def _export_into(holder, model_dir, config_json, staging, precision, opset, progress, decoder_form,
                 checks, vision_precision: str) -> dict[str, Any]:
    """Write, convert and verify the section's files in `staging`; returns the section dict.

    `holder` is [model, processor]; the model is removed from it (and freed) after the ONNX export.
    Autograd is switched off only inside torch.no_grad() blocks, never globally: the exporter runs
    in-process next to training code (`octopus-rt train` exports after merging).
    """
    import onnx

    from octopus_rt.export import lmm_manifest
    from octopus_rt.export.decoder_forms import resolve_form
    from octopus_rt.export.llava_graphs import vision_input_size
    from octopus_rt.export.llava_wrappers import decoder_dims
    from octopus_rt.export.lmm_reference import compute_reference

    processor = holder[1]
    model = holder[0]
    holder[0] = None
    dims = decoder_dims(model.config.get_text_config())
    try:
        form, form_reason = resolve_form(decoder_form, model.config.get_text_config(), precision)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    image_token_id = int(model.config.image_token_id)
    source = LmmSource(
        model_dir=str(model_dir),
        architectures=list(config_json.get("architectures") or []),
        text_model_type=model.config.get_text_config().model_type,
        vision_model_type=model.config.vision_config.model_type,
        num_parameters=int(sum(p.numel() for p in model.parameters())),
    )
    tokenizer = TokenizerSpec(
        file=TOKENIZER_FILE,
        bos_token_id=processor.tokenizer.bos_token_id,
        eos_token_ids=lmm_manifest.eos_token_ids(model, processor.tokenizer),
        pad_token_id=processor.tokenizer.pad_token_id,
    )

    progress(f"computing the PyTorch reference ({_GENERATION_STEPS} greedy steps, batch 2, left padding)")
    reference = compute_reference(model, processor, steps=_GENERATION_STEPS)
    num_image_tokens = int(reference.vision[0].features.shape[1])
    vision_hidden = int(reference.vision[0].features.shape[2])

    tokenizer_json = staging / TOKENIZER_FILE
    processor.tokenizer.backend_tokenizer.save(str(tokenizer_json))
    prompt = lmm_manifest.prompt_spec(processor, image_token_id, num_image_tokens)
    lmm_manifest.check_prompt(prompt, tokenizer_json, processor)
    closed, closed_forms = lmm_manifest.closed_set_ids(tokenizer_json, progress)
    preprocess = lmm_manifest.preprocess_spec(processor, model)
    embedding = write_embedding(model, staging, precision)
    vision, decoder = graph_specs(model, num_image_tokens, vision_hidden, form, form_reason, vision_precision)

    progress(f"exporting {vision.file} and {decoder.file} (opset {opset}, fp32, decoder form {form}: {form_reason})")
    converted = precision != "fp32" or vision_precision != "fp32"
    fp32_dir = staging / ".fp32" if converted else staging
    fp32_dir.mkdir(exist_ok=True)
    export_llava_graphs(model, fp32_dir, opset, form, image_size=(preprocess.input_height, preprocess.input_width))
    # The reference and the exported graphs are all we need from PyTorch: free the model before
    # any onnxruntime session (or quantizer) allocates its own copy of the weights.
    del model
    gc.collect()
    if converted:
        progress(f"converting to {precision} (vision graph {vision_precision})")
        quantization = convert_graphs(fp32_dir, staging, vision.file, decoder.file, precision, form, vision_precision)
        decoder = dataclasses.replace(decoder, quantization=quantization)
        shutil.rmtree(fp32_dir)

    verification = _verify(reference, staging, vision.file, decoder.file, embedding.file, dims, image_token_id,
                           precision, form, checks, progress, vision_precision)
    graph = onnx.load(str(staging / decoder.file), load_external_data=False)
    return lmm_manifest.lmm_section(
        opset=opset, ir_version=int(graph.ir_version), precision=precision, source=source, vision=vision,
        embedding=embedding, decoder=decoder, tokenizer=tokenizer, preprocess=preprocess, prompt=prompt,
        closed_set=closed, closed_set_forms=closed_forms, verification=verification,
    ).to_dict()


def write_embedding(model, staging: Path, precision: str) -> EmbeddingTable:
    """The LM's input embedding table as a .npy file (float16 for an fp16 bundle, else float32)."""
    embed = model.get_input_embeddings().weight.detach().float().numpy()
    dtype = np.float16 if precision == "fp16" else np.float32
    np.save(staging / EMBEDDING_FILE, embed.astype(dtype))
    return EmbeddingTable(file=EMBEDDING_FILE, vocab_size=int(embed.shape[0]), hidden_size=int(embed.shape[1]),
                          dtype=np.dtype(dtype).name)


def convert_graphs(fp32_dir: Path, staging: Path, vision_file: str, decoder_file: str, precision: str,
                   form: str = "flat_kv", vision_precision: str | None = None):
    """fp32 graphs in `fp32_dir` -> a `precision` decoder and a `vision_precision` vision graph
    (default quantize.default_vision_precision) in `staging` (export/quantize.py); returns the decoder's
    quantisation record (None for fp32 / fp16). A gqa decoder keeps its weights in external data."""
    from octopus_rt.export import quantize

    external = form == "gqa"
    vision_precision = vision_precision or quantize.default_vision_precision(precision)
    converters = {"int8": quantize.to_int8, "fp16": quantize.to_fp16}
    _convert_or_copy(fp32_dir, staging, vision_file, converters.get(vision_precision))
    if precision == "fp32":
        _convert_or_copy(fp32_dir, staging, decoder_file, None)
        return None
    if precision == "fp16":
        quantize.to_fp16(fp32_dir / decoder_file, staging / decoder_file)
        return None
    convert = quantize.to_int8 if precision == "int8" else quantize.to_int4
    convert(fp32_dir / decoder_file, staging / decoder_file, external=external)
    return quantize.RECIPES[precision]


def _convert_or_copy(fp32_dir: Path, staging: Path, file: str, convert) -> None:
    """`convert(src, dst)` one graph into staging, or copy it (with its external data, if any)."""
    if convert is not None:
        convert(fp32_dir / file, staging / file)
        return
    for path in fp32_dir.glob(f"{file}*"):
        shutil.copy(path, staging / path.name)


def _verify(reference, staging: Path, vision_file: str, decoder_file: str, embedding_file: str, dims,
            image_token_id: int, precision: str, form: str, checks, progress: Callable[[str], None],
            vision_precision: str) -> LmmVerification:
    """export/lmm_verify.py on the staged graphs; the section's verification record, or OctopusError
    listing the failed checks (failures the user accepted with --accept-quality-loss are warned about)."""
    from octopus_rt.export.lmm_verify import judged_record, verify_lmm

    limits, overrides = checks
    progress(f"verifying in onnxruntime ({precision}, {form} decoder, {vision_precision} vision)")
    embed = np.load(staging / embedding_file, mmap_mode="r")
    report = verify_lmm(reference, staging / vision_file, staging / decoder_file, embed, dims, image_token_id,
                        precision, form=form, limits=limits, vision_precision=vision_precision)
    progress(
        f"verified {precision} ({form} decoder, {vision_precision} vision): vision max|diff| {report.vision_max_abs_diff:.2e} "
        f"(relative {report.vision_max_rel_diff:.1e}), decoder max|diff| {report.decoder_max_abs_diff:.2e} "
        f"(relative {report.decoder_max_rel_diff:.1e}) at {len(reference.decoder)} shapes, {report.steps} steps: "
        f"logits max|diff| {report.generation_max_abs_diff:.2e}, min cosine {report.generation_min_cosine:.6f}, "
        f"top-1 {report.top1_agreement:.3f}, greedy tokens identical: {report.tokens_identical}"
    )
    return judged_record(report, limits, overrides, progress)

"""`export lmm` steps for a Phi-3(.5)-Vision checkpoint (export/lmm.py runs them for a phi3v config).

Same steps as LLaVA's, with Phi-3-V's pieces:

1. the PyTorch reference (export/phi3v_verify.compute_phi3v_reference) while the model is loaded;
2. tokenizer.json copied as the checkpoint ships it; the prompt pieces rendered from its chat
   template around a sentinel and checked against the official processor's ids for several
   questions, answer prefixes and aspect ratios (`check_phi3v_prompt`); closed-set ids from that
   tokenizer (single-token SentencePiece forms such as "▁left"); stop ids (config.json eos 2,
   `<|end|>` 32007, the tokenizer's eos, generation_config.json's eos when present);
3. embed_tokens.npy, vision.onnx + separators.npy + decoder.onnx in fp32 (export/phi3v_graphs.py);
   the model is freed; conversion to the requested precision (export/lmm.py's converter);
4. verification in onnxruntime (export/phi3v_verify.py); the section with `architecture: phi3v`
   and `hd` (octopus_rt/manifest_lmm.py).
"""

from __future__ import annotations

import dataclasses

import gc
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from octopus_rt import vocab
from octopus_rt.errors import InputError, OctopusError
from octopus_rt.manifest_lmm import LmmSource, PromptSpec, TokenizerSpec, VisionPreprocessSpec

__all__ = ["GENERATION_STEPS", "IMAGE_TAG", "phi3v_prompt_spec", "check_phi3v_prompt", "export_phi3v_into"]

# 40 greedy steps: with the tiny test checkpoint (switch at 512) the 2:1 image's prompt ends below the
# longrope switch and its decoding crosses it.
GENERATION_STEPS = 40
IMAGE_TAG = "<|image_1|>"
PLACEHOLDER_ID = -1  # image 1's placeholder id (Phi3VProcessor)
SENTINEL = "QUESTIONSENTINEL"


def phi3v_prompt_spec(tokenizer, max_tokens: int) -> PromptSpec:
    """The chat template rendered once around "<|image_1|>\\n" + a sentinel question and split into
    plain strings; chunked tokenisation with special tokens and a per-image token count."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the checkpoint's tokenizer has no chat template (tokenizer_config.json chat_template)")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": f"{IMAGE_TAG}\n{SENTINEL}"}],
                                             add_generation_prompt=True, tokenize=False)
    if rendered.count(IMAGE_TAG) != 1 or rendered.count(SENTINEL) != 1:
        raise OctopusError(f"the chat template does not render one {IMAGE_TAG} and one question")
    prefix, rest = rendered.split(IMAGE_TAG)
    infix, suffix = rest.split(SENTINEL)
    return PromptSpec(prefix=prefix, image_token=IMAGE_TAG, image_token_id=PLACEHOLDER_ID, num_image_tokens=max_tokens,
                      infix=infix, suffix=suffix, add_special_tokens=True, tokenize_chunks=True,
                      variable_image_tokens=True)


def check_phi3v_prompt(prompt: PromptSpec, tokenizer_json: Path, tokenizer, hd) -> None:
    """The runtime's prompt ids (runtime/image_stage.py from the section's pieces) must equal the
    official processor's (export/phi3v_reference.official_prompt_ids) for every question kind."""
    from tokenizers import Tokenizer

    from octopus_rt.export.phi3v_reference import official_prompt_ids
    from octopus_rt.runtime.image_stage import Phi3VImageStage

    # Only the prompt side of the stage runs here (no graph, no normalisation).
    preprocess = VisionPreprocessSpec([0.0] * 3, [1.0] * 3, hd.crop_size, hd.crop_size)
    stage = Phi3VImageStage(prompt, hd, preprocess, None, lambda: None, Path)
    runtime_tokenizer = Tokenizer.from_file(str(tokenizer_json))
    cases = [(q, "") for q in ("Which region is most degraded?", vocab.format_mcq_question("Is it blurry?", ["Yes", "No"]))]
    cases.append((vocab.SCORE_QUESTION, vocab.SCORE_ANSWER_PREFIX))
    for (question, answer_prefix), size in zip(cases, ((640, 320), (200, 600), (500, 500))):
        got = stage.prompt(runtime_tokenizer, question, answer_prefix, size)
        expected = official_prompt_ids(tokenizer, question, len(got.image_positions), answer_prefix)[0].tolist()
        if got.ids.tolist() != expected:
            raise OctopusError(f"pre-rendered prompt does not tokenize like the official processor for {question!r} "
                               f"({len(got.ids)} vs {len(expected)} ids)")


def _preprocess_spec(spec) -> VisionPreprocessSpec:
    crop = spec.crop_size
    return VisionPreprocessSpec(
        image_mean=list(spec.image_mean), image_std=list(spec.image_std), input_height=crop, input_width=crop,
        size={"height": crop, "width": crop}, image_processor_type="Phi3VImageProcessor", backend="pil",
        resample="bilinear", do_center_crop=False, crop_size=None,
    )


def export_phi3v_into(holder: list, model_dir: Path, config_json: dict, staging: Path, precision: str, opset: int,
                      progress: Callable[[str], None], *, checks, form: str = "flat_kv") -> dict[str, Any]:
    """Write, convert and verify a Phi-3-V section's files in `staging`; returns the section dict.
    `holder` is [model, tokenizer]; the model is removed from it (and freed) after the ONNX export.
    checks: (VerifyThresholds, VerifyOverrides) from export.lmm_verify.user_limits."""
    import onnx

    from octopus_rt.export import lmm_manifest
    from octopus_rt.export.lmm import EMBEDDING_FILE, TOKENIZER_FILE, convert_graphs, write_embedding
    from octopus_rt.export.phi3v_graphs import SEPARATORS_FILE, export_phi3v_graphs, graph_specs
    from octopus_rt.export.phi3v_reference import official_stop_ids
    from octopus_rt.export import phi3v_verify
    from octopus_rt.export.lmm_verify import judged_record

    model, tokenizer = holder[0], holder[1]
    holder[0] = None
    spec = model.spec
    for note in spec.warnings:
        progress(f"note: {note}")
    num_crops = spec.num_crops
    stop_ids = official_stop_ids(model_dir, tokenizer)
    source = LmmSource(model_dir=str(model_dir), architectures=list(config_json.get("architectures") or []),
                       text_model_type="phi3", vision_model_type="clip_vision_model",
                       num_parameters=int(sum(p.numel() for p in model.parameters())))
    tokenizer_spec = TokenizerSpec(file=TOKENIZER_FILE, bos_token_id=tokenizer.bos_token_id, eos_token_ids=stop_ids,
                                   pad_token_id=tokenizer.pad_token_id)

    progress(f"computing the PyTorch reference ({GENERATION_STEPS} greedy steps at 2 aspect ratios, "
             f"vision at {sorted({4, 16, num_crops})} crops)")
    reference = phi3v_verify.compute_phi3v_reference(model, tokenizer, num_crops, steps=GENERATION_STEPS, stop_ids=stop_ids)
    vision, decoder, hd = graph_specs(model, num_crops, form)
    shutil.copyfile(model_dir / "tokenizer.json", staging / TOKENIZER_FILE)
    prompt = phi3v_prompt_spec(tokenizer, vision.num_image_tokens)
    check_phi3v_prompt(prompt, staging / TOKENIZER_FILE, tokenizer, hd)
    closed, closed_forms = lmm_manifest.closed_set_ids(staging / TOKENIZER_FILE, progress)
    embedding = write_embedding(model.language_model, staging, precision)

    progress(f"exporting {vision.file}, {SEPARATORS_FILE} and {decoder.file} ({form}, opset {opset}, fp32)")
    fp32_dir = staging / ".fp32" if precision != "fp32" else staging
    fp32_dir.mkdir(exist_ok=True)
    export_phi3v_graphs(model, fp32_dir, opset, form)
    # Everything PyTorch is needed for is done: free the weights before onnxruntime loads its copy.
    del model
    gc.collect()
    if precision != "fp32":
        shutil.move(str(fp32_dir / SEPARATORS_FILE), str(staging / SEPARATORS_FILE))
        progress(f"converting to {precision}")
        decoder = dataclasses.replace(decoder, quantization=convert_graphs(fp32_dir, staging, vision.file, decoder.file,
                                                                           precision, form))
        shutil.rmtree(fp32_dir)

    progress(f"verifying in onnxruntime ({precision})")
    limits, overrides = checks
    report, extra = phi3v_verify.verify_phi3v(
        reference, staging / vision.file, staging / decoder.file, np.load(staging / EMBEDDING_FILE, mmap_mode="r"),
        np.load(staging / SEPARATORS_FILE), decoder, closed, precision, limits)
    progress(
        f"verified {precision}: image tokens max|diff| {report.vision_max_abs_diff:.2e} at {extra['vision_num_crops']} crops, "
        f"decoder max|diff| {report.decoder_max_abs_diff:.2e}, {report.steps} steps at prompts of "
        f"{extra['generation_prompt_tokens']} tokens: logits max|diff| {report.generation_max_abs_diff:.2e}, "
        f"closed-set max|diff| {extra['closed_set_max_abs_diff']:.2e}, top-1 {report.top1_agreement:.3f}, "
        f"greedy tokens identical: {report.tokens_identical}"
    )
    record = judged_record(report, limits, overrides, progress)
    graph = onnx.load(str(staging / decoder.file), load_external_data=False)
    return lmm_manifest.lmm_section(
        opset=opset, ir_version=int(graph.ir_version), precision=precision, source=source, vision=vision,
        embedding=embedding, decoder=decoder, tokenizer=tokenizer_spec, preprocess=_preprocess_spec(spec), prompt=prompt,
        closed_set=closed, closed_set_forms=closed_forms, verification=dataclasses.replace(record, **extra),
        architecture="phi3v", hd=hd,
    ).to_dict()

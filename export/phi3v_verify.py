"""Built-in verification of an exported Phi-3(.5)-Vision section against the PyTorch model.

`compute_phi3v_reference` runs the native PyTorch model (export/phi3v_model.py) before any
onnxruntime session exists and keeps numpy arrays only, so the exporter can free the model first:

- vision: images at num_crops 4 and 16 (and the bundle's own) through the official preprocessing
  (export/phi3v_reference.official_pixel_values) and the model's own layout-then-project path
  -> the image tokens T x H the decoder receives;
- decoder: random inputs_embeds / KV caches through transformers' Phi3 decoder itself, with
  positions on both sides of the longrope switch (the graph must pick the table as transformers does);
- generation: a landscape 2:1 and a portrait 1:3 image with the official prompt ids, greedy for
  `steps` tokens with the official cache re-run at the longrope switch (phi3v_reference.greedy).

`verify_phi3v` replays them with onnxruntime and the runtime's own pieces (the `sub_glb` gather of
runtime/phi3v_layout.py, the decoder loop of runtime/generate.py, which re-runs the cache at the
switch): vision tokens, decoder logits and presents, and greedy tokens identical to PyTorch, with
the closed-set probabilities (paper eq. 2, every word group) within CLOSED_SET_LIMIT for fp32.
Other precisions are teacher-forced along the PyTorch tokens with export/lmm_verify's thresholds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from octopus_rt import vocab
from octopus_rt.export.lmm_verify import (
    THRESHOLDS,
    VerifyReport,
    agreement_failures,
    cosine_rows,
    make_session,
    scale_aware_failure,
)

__all__ = ["CLOSED_SET_LIMIT", "GENERATION_IMAGES", "Phi3VReference", "compute_phi3v_reference", "verify_phi3v"]

CLOSED_SET_LIMIT = 1e-4  # fp32: max |p_onnx - p_torch| of any closed-set word at any step
# (width, height) of the generation images: landscape 2:1 and portrait 1:3 (transposed by the HD transform).
GENERATION_IMAGES: tuple[tuple[int, int], ...] = ((160, 80), (60, 180))
VISION_IMAGE = (150, 100)  # 3:2, a grid that differs between 4 and 16 crops
VISION_CROPS = (4, 16)


@dataclass
class VisionCase:
    num_crops: int
    crops: np.ndarray  # float32 N x 3 x c x c: global view + real crops
    grid: tuple[int, int]
    tokens: np.ndarray  # float32 T x H, the model's own layout + projection


@dataclass
class DecoderCase:
    shape: tuple[int, int, int]  # (seq, past, first position)
    inputs: list[np.ndarray]  # decoder_input_names order
    outputs: list[np.ndarray]  # logits (1 x V) + presents


@dataclass
class GenerationCase:
    question: str
    input_ids: np.ndarray  # int64 (S,), image positions hold -1
    crops: np.ndarray
    grid: tuple[int, int]
    tokens: np.ndarray  # int64 (steps,)
    logits: np.ndarray  # float32 steps x V


@dataclass
class Phi3VReference:
    vision: list[VisionCase] = field(default_factory=list)
    decoder: list[DecoderCase] = field(default_factory=list)
    generation: list[GenerationCase] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    rope_switch: int | None = None


def _image(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 25, size=base.shape), 0, 255).astype(np.uint8)


def _used(pixels, size, crop: int):
    rows, cols = size[0] // crop, size[1] // crop
    return pixels[: 1 + rows * cols].numpy().copy(), (rows, cols)


def compute_phi3v_reference(model, tokenizer, num_crops: int, *, steps: int, stop_ids: list[int],
                            seed: int = 0) -> Phi3VReference:
    """PyTorch reference data of `model` (Phi3VForCausalLM, fp32 eval, CPU); see the module docstring."""
    import torch
    from transformers import DynamicCache

    from octopus_rt.export.llava_wrappers import decoder_dims
    from octopus_rt.export.phi3v_reference import (
        greedy,
        official_num_image_tokens,
        official_pixel_values,
        official_prompt_ids,
    )
    from octopus_rt.export.phi3v_wrappers import rope_switch_length

    spec = model.spec
    crop = spec.crop_size
    reference = Phi3VReference(stop_ids=list(stop_ids), rope_switch=rope_switch_length(model.config))
    for crops_budget in sorted({*VISION_CROPS, num_crops}):
        pixels, size = official_pixel_values(_image(*VISION_IMAGE, seed), crops_budget, crop, spec.image_mean, spec.image_std)
        with torch.no_grad():
            tokens = model.vision_embed_tokens(pixels[None], [size])[0].float().numpy()
        used, grid = _used(pixels, size, crop)
        reference.vision.append(VisionCase(crops_budget, used, grid, tokens))

    dims = decoder_dims(model.config)
    generator = torch.Generator().manual_seed(seed)
    scale = float(model.language_model.get_input_embeddings().weight.detach().std())
    switch = reference.rope_switch
    shapes = [(9, 0, 0), (1, 13, 13), (3, 4, 4)]
    if switch is not None and switch + 2 < dims.max_position_embeddings:
        # Positions are an input of their own: a short cache can sit at any position, so both tables
        # are exercised without a cache of `switch` tokens.
        shapes += [(1, 3, switch - 1), (1, 3, switch), (3, 2, switch - 1)]
    for seq, past, first in shapes:
        embeds = torch.randn(1, seq, dims.hidden_size, generator=generator) * scale
        pasts = [torch.randn(1, dims.num_key_value_heads, past, dims.head_dim, generator=generator)
                 for _ in range(2 * dims.num_layers)]
        mask = torch.ones(1, past + seq, dtype=torch.long)
        positions = torch.arange(first, first + seq)[None]
        cache = DynamicCache(ddp_cache_data=[(pasts[2 * i].clone(), pasts[2 * i + 1].clone()) for i in range(dims.num_layers)])
        with torch.no_grad():
            out = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                       past_key_values=cache, use_cache=True)
        presents = [t.numpy().copy() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        reference.decoder.append(DecoderCase(
            (seq, past, first), [embeds.numpy(), mask.numpy(), positions.numpy(), *[p.numpy() for p in pasts]],
            [out.logits[:, -1].numpy().copy(), *presents]))

    questions = (vocab.SCORE_QUESTION, "Which region is most degraded?")
    for index, ((width, height), question) in enumerate(zip(GENERATION_IMAGES, questions)):
        pixels, size = official_pixel_values(_image(width, height, seed + 1 + index), num_crops, crop,
                                             spec.image_mean, spec.image_std)
        count = official_num_image_tokens(size, crop, spec.tokens_per_side)
        ids = official_prompt_ids(tokenizer, question, count)
        tokens, logits = greedy(model, ids, pixels, size, steps, stop_ids=stop_ids, mask_stop=True)
        used, grid = _used(pixels, size, crop)
        reference.generation.append(GenerationCase(
            question, ids[0].numpy().astype(np.int64), used, grid, np.asarray(tokens, dtype=np.int64),
            torch.stack(logits).numpy()))
    return reference


def _closed_set_probs(logits: np.ndarray, closed_set: dict[str, list[int]]) -> np.ndarray:
    """Eq. 2 at tau 1 for every word group, every step: steps x words (float64)."""
    groups = (vocab.HORIZONTAL_WORDS, vocab.VERTICAL_WORDS, vocab.LEVEL_WORDS, vocab.OPTION_LETTERS)
    rows = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])
    out = []
    for words in groups:
        scores = np.stack([np.logaddexp.reduce(rows[:, closed_set[w]], axis=1) for w in words], axis=1)
        scores -= scores.max(axis=1, keepdims=True)
        out.append(np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True))
    return np.concatenate(out, axis=1)


def verify_phi3v(reference: Phi3VReference, vision_path: str | os.PathLike[str], decoder_path: str | os.PathLike[str],
                 embed: np.ndarray, separators: np.ndarray, decoder_spec, closed_set: dict[str, list[int]],
                 precision: str, limits=None) -> tuple[VerifyReport, dict]:
    """Run the staged graphs on the reference cases (module docstring). Returns the report (its
    `failures` empty when every check passed) and extra figures for the manifest's verification.
    limits: VerifyThresholds (default export.lmm_verify.THRESHOLDS[precision]; the user's lowered ones
    from user_limits): fp32 is judged scale-aware per output, like LLaVA, plus the closed-set limit."""
    from octopus_rt.export.llava_wrappers import decoder_input_names
    from octopus_rt.runtime.backends import Graph
    from octopus_rt.runtime.generate import Decoder
    from octopus_rt.runtime.phi3v_layout import assemble_image_tokens

    limits = limits or THRESHOLDS[precision]
    report = VerifyReport(precision=precision)
    outputs: list[tuple[str, float, float]] = []  # (label, max |diff|, max |reference|) for the fp32 criterion
    vision = make_session(vision_path)
    decoder_session = make_session(decoder_path)

    def image_tokens(crops, grid):
        return assemble_image_tokens(vision.run(None, {"pixel_values": crops})[0], separators, grid)

    for case in reference.vision:
        got = image_tokens(case.crops, case.grid)
        if got.shape != case.tokens.shape:
            report.failures.append(f"vision at {case.num_crops} crops: {got.shape} tokens != {case.tokens.shape}")
            continue
        diff, scale = float(np.abs(got - case.tokens).max()), float(np.abs(case.tokens).max())
        outputs.append((f"image tokens at {case.num_crops} crops", diff, scale))
        report.vision_max_abs_diff = max(report.vision_max_abs_diff, diff)
        report.vision_max_rel_diff = max(report.vision_max_rel_diff, diff / max(scale, 1e-30))
        report.vision_min_cosine = min(report.vision_min_cosine, float(cosine_rows(got, case.tokens).min()))

    names = decoder_input_names(decoder_spec.num_layers)
    for case in reference.decoder:
        got = decoder_session.run(None, dict(zip(names, case.inputs)))
        if any(g.shape != r.shape for g, r in zip(got, case.outputs)):
            report.failures.append(f"decoder (seq, past, position)={case.shape}: output shapes differ")
            continue
        for index, (g, r) in enumerate(zip(got, case.outputs)):
            diff, scale = float(np.abs(g - r).max()), float(np.abs(r).max())
            label = "logits" if index == 0 else f"present {index - 1}"
            outputs.append((f"decoder {label} at (seq, past, position)={case.shape}", diff, scale))
            report.decoder_max_abs_diff = max(report.decoder_max_abs_diff, diff)
            report.decoder_max_rel_diff = max(report.decoder_max_rel_diff, diff / max(scale, 1e-30))
        report.decoder_min_cosine = min(report.decoder_min_cosine, float(cosine_rows(got[0], case.outputs[0]).min()))

    decoder = Decoder(Graph("decoder", decoder_session, "cpu"), embed, decoder_spec)
    all_logits, all_reference, closed_gap, crossings = [], [], 0.0, 0
    for case in reference.generation:
        steps = len(case.tokens)
        embeds = decoder.embed(np.maximum(case.input_ids, 0))
        embeds[0, case.input_ids < 0] = image_tokens(case.crops, case.grid).astype(embeds.dtype)
        logits, state = decoder.forward(embeds, decoder.empty_state())
        tokens, step_logits = [], []
        for step in range(steps):
            step_logits.append(logits)
            if limits.identical_tokens:
                scores = logits.copy()
                scores[reference.stop_ids] = -np.inf
                token = int(np.argmax(scores))
            else:
                token = int(case.tokens[step])
            tokens.append(token)
            if step < steps - 1:
                before = state.length
                logits, state = decoder.forward(decoder.embed([token]), state)
                crossings += int(reference.rope_switch is not None and before <= reference.rope_switch < state.length)
        report.steps += steps
        step_logits = np.stack(step_logits)
        if limits.identical_tokens and not np.array_equal(tokens, case.tokens):
            first = int(np.argmax(np.asarray(tokens) != case.tokens))
            report.failures.append(f"greedy tokens differ from PyTorch from step {first} of {steps} ({case.question!r})")
            report.tokens_identical = False
        closed_gap = max(closed_gap, float(np.abs(_closed_set_probs(step_logits, closed_set)
                                                  - _closed_set_probs(case.logits, closed_set)).max()))
        all_logits.append(step_logits)
        all_reference.append(case.logits)
    logits, expected = np.concatenate(all_logits), np.concatenate(all_reference)
    report.generation_max_abs_diff = float(np.abs(logits - expected).max())
    report.generation_max_rel_diff = report.generation_max_abs_diff / max(float(np.abs(expected).max()), 1e-30)
    outputs.append(("generation logits", report.generation_max_abs_diff, float(np.abs(expected).max())))
    report.generation_min_cosine = float(cosine_rows(logits, expected).min())
    report.top1_agreement = float((logits.argmax(-1) == expected.argmax(-1)).mean())

    if limits.rtol is not None:  # fp32: every output scale-aware (as LLaVA), and the closed-set probabilities
        failure = scale_aware_failure(outputs, limits)
        if failure:
            report.failures.append(failure)
        if closed_gap > CLOSED_SET_LIMIT:
            report.failures.append(f"closed-set probabilities differ by {closed_gap:.3g} > {CLOSED_SET_LIMIT:g}")
    report.failures.extend(agreement_failures(report, limits))
    extra = {
        "closed_set_max_abs_diff": closed_gap,
        "vision_num_crops": [case.num_crops for case in reference.vision],
        "generation_prompt_tokens": [int(len(case.input_ids)) for case in reference.generation],
        "rope_switch_crossings": crossings,
    }
    return report, extra

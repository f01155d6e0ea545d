"""Check exported LMM graphs in onnxruntime (CPU) against the PyTorch reference of lmm_reference.

The ONNX generation loop here is the runtime's loop in miniature: embedding lookup from the
exported table, image features written at the image-token positions, one prefill call, then
sequence-length-1 decode steps with the KV cache fed back.

Thresholds (issue 2): fp32 logits max |diff| <= 1e-4 and greedy tokens identical to generate();
other precisions are teacher-forced along the fp32 PyTorch tokens: top-1 agreement >= 99% and
logits cosine >= 0.999 (fp16) / 0.99 (int8, int4).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from octopus_rt.export.lmm_reference import LmmReference
from octopus_rt.export.llava_wrappers import DecoderDims, decoder_input_names

__all__ = ["Thresholds", "THRESHOLDS", "VerifyReport", "cosine_rows", "make_session", "onnx_generate", "verify_lmm"]


@dataclass(frozen=True)
class Thresholds:
    max_abs_diff: float | None  # fp32 only
    min_cosine: float
    min_top1: float
    identical_tokens: bool


THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(max_abs_diff=1e-4, min_cosine=0.999, min_top1=1.0, identical_tokens=True),
    "fp16": Thresholds(max_abs_diff=None, min_cosine=0.999, min_top1=0.99, identical_tokens=False),
    "int8": Thresholds(max_abs_diff=None, min_cosine=0.99, min_top1=0.99, identical_tokens=False),
    "int4": Thresholds(max_abs_diff=None, min_cosine=0.99, min_top1=0.99, identical_tokens=False),
}


@dataclass
class VerifyReport:
    """Measured agreement; `failures` lists one line per failed check (empty = passed)."""

    precision: str
    vision_max_abs_diff: float = 0.0
    vision_min_cosine: float = 1.0
    decoder_max_abs_diff: float = 0.0
    decoder_min_cosine: float = 1.0
    generation_max_abs_diff: float = 0.0
    generation_min_cosine: float = 1.0
    top1_agreement: float = 1.0
    tokens_identical: bool = True
    steps: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "failures"}


def make_session(path: str | os.PathLike[str], threads: int = 1):
    """An onnxruntime CPU session with `threads` intra-op threads (1 keeps shared CI machines calm)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(denom, 1e-30)


def onnx_generate(
    vision,
    decoder,
    embed: np.ndarray,
    dims: DecoderDims,
    image_token_id: int,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    pixel_values: np.ndarray,
    steps: int,
    *,
    forced_tokens: np.ndarray | None = None,
    min_new_tokens: int = 0,
    eos_token_ids: tuple[int, ...] | list[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy (or teacher-forced) decoding with the ONNX graphs.

    input_ids / attention_mask int64 B x T (left padded, with `num_image_tokens` image tokens per
    row), pixel_values float32 B x 3 x H x W. Returns (tokens int64 B x steps, logits float32
    steps x B x V). With `forced_tokens` (B x steps) the fed token is the forced one, not the argmax.
    """
    features = vision.run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]
    embeds = np.asarray(embed[input_ids], dtype=np.float32)
    for row in range(input_ids.shape[0]):
        slots = np.flatnonzero(input_ids[row] == image_token_id)
        if len(slots) != features.shape[1]:
            raise ValueError(f"row {row} has {len(slots)} image tokens, vision graph gives {features.shape[1]}")
        embeds[row, slots] = features[row]
    mask = attention_mask.astype(np.int64)
    positions = np.where(mask == 0, 0, np.cumsum(mask, axis=-1) - 1).astype(np.int64)
    batch = input_ids.shape[0]
    past = [np.zeros((batch, dims.num_key_value_heads, 0, dims.head_dim), np.float32)] * (2 * dims.num_layers)
    names = decoder_input_names(dims.num_layers)
    tokens, all_logits = [], []
    for step in range(steps):
        outputs = decoder.run(None, dict(zip(names, [embeds, mask, positions, *past])))
        logits, past = outputs[0], outputs[1:]
        all_logits.append(logits.astype(np.float32))
        if forced_tokens is not None:
            chosen = forced_tokens[:, step]
        else:
            scores = logits.copy()
            if step < min_new_tokens and eos_token_ids:
                scores[:, list(eos_token_ids)] = -np.inf  # as generate()'s MinNewTokensLengthLogitsProcessor
            chosen = scores.argmax(-1)
        tokens.append(chosen.astype(np.int64))
        embeds = np.asarray(embed[chosen], dtype=np.float32)[:, None, :]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return np.stack(tokens, axis=1), np.stack(all_logits)


def verify_lmm(
    reference: LmmReference,
    vision_path: str | os.PathLike[str],
    decoder_path: str | os.PathLike[str],
    embed: np.ndarray,
    dims: DecoderDims,
    image_token_id: int,
    precision: str,
) -> VerifyReport:
    """Run every graph at the reference's shapes and compare; see the module docstring."""
    limits = THRESHOLDS[precision]
    report = VerifyReport(precision=precision)
    vision = make_session(vision_path)
    decoder = make_session(decoder_path)

    for case in reference.vision:
        got = vision.run(None, {"pixel_values": case.pixel_values})[0]
        if got.shape != case.features.shape:
            report.failures.append(f"vision batch {case.pixel_values.shape[0]}: shape {got.shape} != {case.features.shape}")
            continue
        report.vision_max_abs_diff = max(report.vision_max_abs_diff, float(np.abs(got - case.features).max()))
        report.vision_min_cosine = min(report.vision_min_cosine, float(cosine_rows(got, case.features).min()))

    names = decoder_input_names(dims.num_layers)
    for case in reference.decoder:
        got = decoder.run(None, dict(zip(names, case.inputs)))
        shapes_ok = all(g.shape == r.shape for g, r in zip(got, case.outputs))
        if not shapes_ok:
            report.failures.append(f"decoder (batch, seq, past, pad)={case.shape}: output shapes differ")
            continue
        # Keys/values of left-padding positions are never attended to (masked as keys), and their own
        # fully-masked attention rows are implementation-defined (PyTorch and onnxruntime differ):
        # compare presents at real token positions only.
        real = case.inputs[1].astype(bool)[:, None, :, None]  # B x 1 x (P+S) x 1
        diff = float(np.abs(got[0] - case.outputs[0]).max())
        for g, r in zip(got[1:], case.outputs[1:]):
            diff = max(diff, float(np.abs(np.where(real, g - r, 0.0)).max()))
        report.decoder_max_abs_diff = max(report.decoder_max_abs_diff, diff)
        report.decoder_min_cosine = min(report.decoder_min_cosine, float(cosine_rows(got[0], case.outputs[0]).min()))

    gen = reference.generation
    steps = gen.tokens.shape[1]
    report.steps = steps
    if limits.identical_tokens:
        tokens, logits = onnx_generate(
            vision, decoder, embed, dims, image_token_id, gen.input_ids, gen.attention_mask, gen.pixel_values,
            steps, min_new_tokens=steps, eos_token_ids=gen.eos_token_ids,
        )
        report.tokens_identical = bool(np.array_equal(tokens, gen.tokens))
        if not report.tokens_identical:
            first = int(np.argmax((tokens != gen.tokens).any(axis=0)))
            report.failures.append(f"greedy tokens differ from generate() from step {first} of {steps}")
    else:
        # Teacher forcing along the PyTorch tokens keeps the steps comparable one to one.
        tokens, logits = onnx_generate(
            vision, decoder, embed, dims, image_token_id, gen.input_ids, gen.attention_mask, gen.pixel_values,
            steps, forced_tokens=gen.tokens,
        )
    report.generation_max_abs_diff = float(np.abs(logits - gen.logits).max())
    report.generation_min_cosine = float(cosine_rows(logits, gen.logits).min())
    report.top1_agreement = float((logits.argmax(-1) == gen.logits.argmax(-1)).mean())

    if limits.max_abs_diff is not None:
        for label, value in (
            ("vision", report.vision_max_abs_diff),
            ("decoder", report.decoder_max_abs_diff),
            ("generation logits", report.generation_max_abs_diff),
        ):
            if value > limits.max_abs_diff:
                report.failures.append(f"{label} max |diff| {value:.3g} > {limits.max_abs_diff:g}")
    for label, value in (
        ("vision features", report.vision_min_cosine),
        ("decoder logits", report.decoder_min_cosine),
        ("generation logits", report.generation_min_cosine),
    ):
        if value < limits.min_cosine:
            report.failures.append(f"{label} cosine {value:.5f} < {limits.min_cosine}")
    if report.top1_agreement < limits.min_top1:
        report.failures.append(f"teacher-forced top-1 agreement {report.top1_agreement:.3f} < {limits.min_top1}")
    return report

"""Check exported LMM graphs in onnxruntime (CPU) against the PyTorch reference of lmm_reference.

The ONNX generation loop here is the runtime's loop in miniature: embedding lookup from the
exported table, image features written at the image-token positions, one prefill call, then
sequence-length-1 decode steps with the KV cache fed back (decoder_forms.gqa_generate for the gqa
form: rows prefilled alone into a shared KV buffer, then decoded together).

Criteria (docs/export.md, "What is verified"):
- fp32: per output (vision features, each decoder case's logits and every present, the generation
  logits), max |diff| <= atol + rtol * max |reference| (scale-aware: a model whose activations reach
  100+ has float32 rounding errors 100x larger than one whose activations stay near 1, and is not
  broken for it), logits cosine >= 0.99999 and greedy tokens identical to generate();
- other precisions, teacher-forced along the fp32 PyTorch tokens: logits cosine >= min_cosine and
  top-1 agreement >= min_top1 (defaults below; a user may lower them or accept the loss, recorded in
  the manifest and printed by `octopus-rt verify`).

A vision graph converted below fp32 next to an fp32 decoder (export lmm --vision-precision fp16) is
judged by its precision's criteria (`judged_precision`): the generation cannot match fp32 exactly once
the image features carry fp16 rounding. The decoder's own cases (random inputs, no image) still get
the fp32 criterion then, since the decoder graph is fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from octopus_rt.export.decoder_forms import next_tokens
from octopus_rt.export.lmm_reference import LmmReference
from octopus_rt.export.llava_wrappers import DecoderDims, decoder_input_names
from octopus_rt.verification import LmmVerification, VerifyOverrides, VerifyThresholds

__all__ = ["THRESHOLDS", "VerifyReport", "agreement_failures", "cosine_rows", "judged_precision", "make_session",
           "onnx_generate", "scale_aware_failure", "user_limits", "verification_record", "verify_lmm"]


# fp32 rtol 1e-3: float32 rounding across ~20 layers measured 1e-7..1e-4 relative to the output's
# magnitude (tiny test models 4e-7, weights x3 model 7e-5); a real bug (wrong rotary base) measured
# >= 1e-2 (tests/test_verify_criteria.py).
# Quantised defaults, measured on a briefly trained model (tests/test_verify_criteria.py, docs/export.md):
# generation-logits cosine 0.9999 (int8) / 0.994 (int4), teacher-forced top-1 0.984 (int8: one flip
# in 64 positions, at a near-tie) / 1.000 (int4). The random-input decoder cases (random embeddings
# and KV cache, out of distribution for a trained model) measured cosine 0.986 at int4 while the real
# prompts gave 0.994: for quantised precisions they are reported, not judged.
THRESHOLDS: dict[str, VerifyThresholds] = {
    "fp32": VerifyThresholds(rtol=1e-3, atol=1e-4, min_cosine=0.99999, min_top1=1.0, identical_tokens=True),
    "fp16": VerifyThresholds(min_cosine=0.999, min_top1=0.99),
    "int8": VerifyThresholds(min_cosine=0.99, min_top1=0.95),
    "int4": VerifyThresholds(min_cosine=0.99, min_top1=0.95),
}


def judged_precision(precision: str, vision_precision: str | None = None) -> str:
    """Whose THRESHOLDS judge an export: the decoder's precision, or the vision graph's when the
    decoder is fp32 and the vision graph is not (None: the vision graph follows the decoder)."""
    return precision if precision != "fp32" or vision_precision is None else vision_precision


@dataclass
class VerifyReport:
    """Measured agreement; `failures` lists one line per failed check (empty = passed). precision: the
    decoder's (the export's); vision_precision: the vision graph's when recorded separately."""

    precision: str
    form: str = "flat_kv"
    vision_precision: str | None = None
    vision_max_abs_diff: float = 0.0
    vision_max_rel_diff: float = 0.0
    decoder_max_rel_diff: float = 0.0
    generation_max_rel_diff: float = 0.0
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


def _rel(diff: float, reference: np.ndarray) -> float:
    """max |diff| relative to the reference output's magnitude (max |reference|, at least 1e-30)."""
    return diff / max(float(np.abs(reference).max()), 1e-30)


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
        chosen = next_tokens(logits, step, forced_tokens, min_new_tokens, eos_token_ids)
        tokens.append(chosen)
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
    *,
    form: str = "flat_kv",
    limits: VerifyThresholds | None = None,
    vision_precision: str | None = None,
) -> VerifyReport:
    """Run every graph at the reference's shapes and compare; see the module docstring.

    `limits` replaces THRESHOLDS[judged_precision(precision, vision_precision)] (user overrides);
    `form` is the decoder graph's form; `vision_precision` the vision graph's (None: as the decoder).
    """
    from octopus_rt.export.decoder_forms import gqa_decoder_case, gqa_generate

    limits = limits or THRESHOLDS[judged_precision(precision, vision_precision)]
    report = VerifyReport(precision=precision, form=form, vision_precision=vision_precision)
    vision = make_session(vision_path)
    decoder = make_session(decoder_path)
    # (label, max |diff|, max |reference|) of every output, for the scale-aware fp32 criterion; the
    # decoder cases apart, since an fp32 decoder is judged by it even next to an fp16 vision graph.
    outputs: list[tuple[str, float, float]] = []
    decoder_outputs: list[tuple[str, float, float]] = []

    for case in reference.vision:
        got = vision.run(None, {"pixel_values": case.pixel_values})[0]
        if got.shape != case.features.shape:
            report.failures.append(f"vision batch {case.pixel_values.shape[0]}: shape {got.shape} != {case.features.shape}")
            continue
        diff = float(np.abs(got - case.features).max())
        outputs.append((f"vision features (batch {case.pixel_values.shape[0]})", diff, float(np.abs(case.features).max())))
        report.vision_max_abs_diff = max(report.vision_max_abs_diff, diff)
        report.vision_max_rel_diff = max(report.vision_max_rel_diff, _rel(diff, case.features))
        report.vision_min_cosine = min(report.vision_min_cosine, float(cosine_rows(got, case.features).min()))

    names = decoder_input_names(dims.num_layers)
    for case in reference.decoder:
        if form == "gqa":
            got = gqa_decoder_case(decoder, dims, case.inputs)
        else:
            got = decoder.run(None, dict(zip(names, case.inputs)))
        shapes_ok = all(g.shape == r.shape for g, r in zip(got, case.outputs))
        if not shapes_ok:
            report.failures.append(f"decoder (batch, seq, past, pad)={case.shape}: output shapes differ")
            continue
        # Keys/values of left-padding positions are never attended to (masked as keys), and their own
        # fully-masked attention rows are implementation-defined (PyTorch and onnxruntime differ):
        # compare presents at real token positions only.
        real = case.inputs[1].astype(bool)[:, None, :, None]  # B x 1 x (P+S) x 1
        for index, (g, r) in enumerate(zip(got, case.outputs)):
            diff = float(np.abs(g - r).max()) if index == 0 else float(np.abs(np.where(real, g - r, 0.0)).max())
            label = "logits" if index == 0 else f"present {index - 1}"
            decoder_outputs.append((f"decoder {label} at (batch, seq, past, pad)={case.shape}", diff,
                                    float(np.abs(r).max())))
            report.decoder_max_abs_diff = max(report.decoder_max_abs_diff, diff)
            report.decoder_max_rel_diff = max(report.decoder_max_rel_diff, _rel(diff, r))
        report.decoder_min_cosine = min(report.decoder_min_cosine, float(cosine_rows(got[0], case.outputs[0]).min()))

    gen = reference.generation
    steps = gen.tokens.shape[1]
    report.steps = steps
    run = gqa_generate if form == "gqa" else onnx_generate
    args = (vision, decoder, embed, dims, image_token_id, gen.input_ids, gen.attention_mask, gen.pixel_values, steps)
    if limits.identical_tokens:
        tokens, logits = run(*args, min_new_tokens=steps, eos_token_ids=gen.eos_token_ids)
        report.tokens_identical = bool(np.array_equal(tokens, gen.tokens))
        if not report.tokens_identical:
            first = int(np.argmax((tokens != gen.tokens).any(axis=0)))
            report.failures.append(f"greedy tokens differ from generate() from step {first} of {steps}")
    else:
        # Teacher forcing along the PyTorch tokens keeps the steps comparable one to one.
        tokens, logits = run(*args, forced_tokens=gen.tokens)
    report.generation_max_abs_diff = float(np.abs(logits - gen.logits).max())
    report.generation_max_rel_diff = _rel(report.generation_max_abs_diff, gen.logits)
    outputs.append(("generation logits", report.generation_max_abs_diff, float(np.abs(gen.logits).max())))
    report.generation_min_cosine = float(cosine_rows(logits, gen.logits).min())
    report.top1_agreement = float((logits.argmax(-1) == gen.logits.argmax(-1)).mean())

    strict_decoder = limits.rtol is None and precision == "fp32"
    failure = scale_aware_failure(outputs + ([] if strict_decoder else decoder_outputs), limits)
    if failure:
        report.failures.append(failure)
    if strict_decoder:
        fp32 = THRESHOLDS["fp32"]
        failure = scale_aware_failure(decoder_outputs, fp32)
        if failure:
            report.failures.append(failure)
        if report.decoder_min_cosine < fp32.min_cosine:
            report.failures.append(f"decoder logits cosine {report.decoder_min_cosine:.5f} < {fp32.min_cosine}")
    report.failures.extend(agreement_failures(report, limits))
    return report


def scale_aware_failure(outputs: list[tuple[str, float, float]], limits: VerifyThresholds) -> str | None:
    """The fp32 criterion over (label, max |diff|, max |reference|) of every compared output: the
    worst output's line when one has max |diff| > atol + rtol x max |reference|, else None (also
    None when `limits` has no rtol, i.e. for quantised precisions). Other architectures' verifiers
    (Phi-3.5-Vision) call it with their own outputs."""
    if limits.rtol is None or not outputs:
        return None
    atol = limits.atol or 0.0
    label, diff, scale = max(outputs, key=lambda o: o[1] - (atol + limits.rtol * o[2]))
    if diff <= atol + limits.rtol * scale:
        return None
    return (f"{label} max |diff| {diff:.3g} > {atol:g} + {limits.rtol:g} x max |reference| {scale:.3g} "
            f"(relative {diff / max(scale, 1e-30):.2g})")


def agreement_failures(report: VerifyReport, limits: VerifyThresholds) -> list[str]:
    """The cosine / top-1 checks (the ones a user may lower or accept for a quantised export)."""
    failures = []
    judged = [("vision features", report.vision_min_cosine), ("generation logits", report.generation_min_cosine)]
    if limits.rtol is not None:  # fp32: the random-input decoder cases too (see THRESHOLDS)
        judged.append(("decoder logits", report.decoder_min_cosine))
    for label, value in judged:
        if value < limits.min_cosine:
            failures.append(f"{label} cosine {value:.5f} < {limits.min_cosine}")
    if report.top1_agreement < limits.min_top1:
        failures.append(f"teacher-forced top-1 agreement {report.top1_agreement:.3f} < {limits.min_top1}")
    return failures


def user_limits(precision: str, min_cosine: float | None = None, min_top1: float | None = None,
                accept_quality_loss: bool = False) -> tuple[VerifyThresholds, VerifyOverrides]:
    """THRESHOLDS[precision] with the user's overrides applied, and the overrides' record
    (`precision`: the judged one, judged_precision).

    Overrides exist for quantised precisions only: an fp32 graph that disagrees with its model is a
    bug, not a trade-off. Raises ValueError for an out-of-range value or an fp32 override.
    """
    from dataclasses import replace

    overrides = VerifyOverrides(min_cosine=None if min_cosine is None else float(min_cosine),
                                min_top1=None if min_top1 is None else float(min_top1),
                                accept_quality_loss=bool(accept_quality_loss))
    if overrides.any and precision == "fp32":
        raise ValueError("--min-cosine, --min-top1 and --accept-quality-loss apply to fp16/int8/int4; "
                         "an fp32 export must match its model (a mismatch is a bug)")
    if min_cosine is not None and not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"--min-cosine must lie in (0, 1], got {min_cosine}")
    if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:
        raise ValueError(f"--min-top1 must lie in [0, 1], got {min_top1}")
    lowered = {k: getattr(overrides, k) for k in ("min_cosine", "min_top1") if getattr(overrides, k) is not None}
    return replace(THRESHOLDS[precision], **lowered), overrides


def verification_record(report: VerifyReport, limits: VerifyThresholds,
                        overrides: VerifyOverrides) -> tuple[LmmVerification, list[str]]:
    """(the manifest's `verification` record, the failures that still refuse the export).

    With accept_quality_loss the agreement failures are kept in the record as `accepted_failures`
    (and `quality_loss_accepted` true) instead of refusing the export; other failures still refuse.
    """
    agreement = agreement_failures(report, limits)
    refusing = list(report.failures)
    accepted: list[str] = []
    if overrides.accept_quality_loss:
        accepted = [f for f in refusing if f in agreement]
        refusing = [f for f in refusing if f not in agreement]
    judged = judged_precision(report.precision, report.vision_precision)
    record = LmmVerification(**report.summary(), thresholds=limits, defaults=THRESHOLDS[judged],
                             overrides=overrides, quality_loss_accepted=bool(accepted), accepted_failures=accepted)
    return record, refusing


def judged_record(report: VerifyReport, limits: VerifyThresholds, overrides: VerifyOverrides,
                  progress) -> LmmVerification:
    """verification_record for an export: OctopusError listing the failures that still refuse it (with
    the options that would keep it, for quantised precisions); a WARNING line through `progress` for each
    failure the user accepted with --accept-quality-loss. Shared by the LLaVA and Phi-3-V exports."""
    from octopus_rt.errors import OctopusError

    record, refusing = verification_record(report, limits, overrides)
    if refusing:
        precision = report.precision
        judged = judged_precision(precision, report.vision_precision)
        hint = "" if judged == "fp32" else " (to keep it anyway: --min-cosine / --min-top1 / --accept-quality-loss)"
        what = precision if judged == precision else f"{precision} (vision {report.vision_precision})"
        raise OctopusError(f"{what} export failed verification: " + "; ".join(refusing) + hint)
    for line in record.accepted_failures:
        progress(f"WARNING quality loss accepted (--accept-quality-loss): {line}")
    return record

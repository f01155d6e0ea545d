"""Decoder forms in `export lmm`: which one to write, and how to run a gqa graph in the checks.

Two forms (manifest `lmm.decoder.form`, octopus_rt/manifest_lmm.DECODER_FORMS):

- `flat_kv`: the torch.onnx trace of llava_wrappers.DecoderWrapper (standard ONNX ops, KV cache
  concatenated each step, attention_mask + position_ids inputs, left padding). Every provider takes
  it, TensorRT included; fp16 uses it.
- `gqa`: export/decoder_graph.py (onnxruntime contrib ops: GroupQueryAttention with fused rotary
  embedding and an in-place KV buffer shared by past and present, SkipSimplifiedLayerNorm, packed
  q|k|v and gate|up MatMuls). Faster on the CPU provider at every precision (docs/runtime.md,
  "Decoder forms"); onnxruntime's CUDA GroupQueryAttention has no float32 kernel and TensorRT runs
  none of these ops, so a gqa decoder runs on the CPU provider (runtime/provider_plan.py).

`auto` picks gqa for fp32 / int8 / int4 when the text model is supported, else flat_kv.

`gqa_generate` / `gqa_decoder_case` run a gqa graph the way the runtime does (rows prefilled one at
a time into their own rows of a shared buffer, then decoded together with per-row lengths), for the
exporter's verification; they never import the runtime.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FORM_CHOICES", "resolve_form", "gqa_run", "gqa_generate", "gqa_decoder_case"]

FORM_CHOICES = ("auto", "flat_kv", "gqa")
_GQA_PRECISIONS = ("fp32", "int8", "int4")


def resolve_form(form: str, text_config, precision: str) -> tuple[str, str]:
    """(form to write, why). Raises ValueError for a form that cannot be written."""
    from octopus_rt.export.decoder_graph import unsupported_reason

    if form not in FORM_CHOICES:
        raise ValueError(f"unknown decoder form {form!r}; choose one of {', '.join(FORM_CHOICES)}")
    reason = unsupported_reason(text_config)
    if precision not in _GQA_PRECISIONS:
        reason = reason or f"precision {precision} (the CPU GroupQueryAttention kernel is float32; fp16 targets GPUs)"
    if form == "flat_kv":
        return "flat_kv", "requested"
    if form == "gqa":
        if reason:
            raise ValueError(f"the gqa decoder form does not support {reason}")
        return "gqa", "requested"
    return ("flat_kv", f"auto: the gqa form does not support {reason}") if reason else ("gqa", "auto")


# --------------------------------------------------------------------------- running (checks)
def gqa_run(session, embeds: np.ndarray, lengths: np.ndarray, buffers: list[np.ndarray], names: list[str]) -> np.ndarray:
    """One call: embeds B x S x hidden, lengths (B,) valid cache lengths after the call, buffers
    2L arrays B x kv x M x hd (written in place). Returns logits B x V."""
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_output("logits")
    binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
    binding.bind_cpu_input("seqlens_k", (np.asarray(lengths) - 1).astype(np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(int(np.max(lengths)), dtype=np.int32))
    for name, buffer in zip(names, buffers):
        value = ort.OrtValue.ortvalue_from_numpy(buffer)
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


def next_tokens(logits: np.ndarray, step: int, forced_tokens: np.ndarray | None, min_new_tokens: int,
                eos_token_ids) -> np.ndarray:
    """The tokens fed at decode `step` (int64 B): the forced ones when teacher forcing (B x steps),
    else the argmax of `logits` (B x V) with the eos ids masked before `min_new_tokens` (as
    generate()'s MinNewTokensLengthLogitsProcessor)."""
    if forced_tokens is not None:
        return forced_tokens[:, step].astype(np.int64)
    scores = logits.copy()
    if step < min_new_tokens and eos_token_ids:
        scores[:, list(eos_token_ids)] = -np.inf
    return scores.argmax(-1).astype(np.int64)


def _names(dims) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(dims.num_layers) for kind in ("key", "value")]


def gqa_generate(vision, decoder, embed, dims, image_token_id, input_ids, attention_mask, pixel_values, steps, *,
                 forced_tokens=None, min_new_tokens=0, eos_token_ids=()):
    """As lmm_verify.onnx_generate (same arguments and returns), for a gqa-form decoder: each row's
    left padding is dropped, rows are prefilled alone, then decoded as one batch."""
    features = vision.run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]
    batch = input_ids.shape[0]
    rows = [input_ids[b][attention_mask[b].astype(bool)] for b in range(batch)]
    capacity = max(len(r) for r in rows) + steps
    names = _names(dims)
    buffers = [np.zeros((batch, dims.num_key_value_heads, capacity, dims.head_dim), np.float32) for _ in names]
    logits = []
    for b, ids in enumerate(rows):
        embeds = np.asarray(embed[ids], dtype=np.float32)[None]
        embeds[0, np.flatnonzero(ids == image_token_id)] = features[b]
        logits.append(gqa_run(decoder, embeds, np.array([len(ids)]), [buf[b:b + 1] for buf in buffers], names)[0])
    logits = np.stack(logits)
    lengths = np.array([len(r) for r in rows])
    tokens, all_logits = [], []
    for step in range(steps):
        all_logits.append(logits.astype(np.float32))
        chosen = next_tokens(logits, step, forced_tokens, min_new_tokens, eos_token_ids)
        tokens.append(chosen)
        if step == steps - 1:
            break
        lengths = lengths + 1
        logits = gqa_run(decoder, np.asarray(embed[chosen], dtype=np.float32)[:, None, :], lengths, buffers, names)
    return np.stack(tokens, axis=1), np.stack(all_logits)


def gqa_decoder_case(decoder, dims, case_inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run a flat_kv decoder case (lmm_reference.DecoderCase inputs) through a gqa graph, row by
    row without its padding. Returns the outputs in decoder_output_names order and layout: logits
    B x V, presents B x kv x (P+S) x hd with each row's real positions where the case has them
    (padding positions stay 0; the comparison skips them)."""
    embeds, mask, _, *past = case_inputs
    batch, seq = embeds.shape[:2]
    total = mask.shape[1]
    past_len = total - seq
    names = _names(dims)
    logits = []
    presents = [np.zeros((batch, dims.num_key_value_heads, total, dims.head_dim), np.float32) for _ in names]
    for b in range(batch):
        real = np.flatnonzero(mask[b])
        old, new = real[real < past_len], real[real >= past_len] - past_len
        buffers = [np.zeros((1, dims.num_key_value_heads, total, dims.head_dim), np.float32) for _ in names]
        for buf, p in zip(buffers, past):
            buf[0, :, : len(old)] = p[b][:, old]
        logits.append(gqa_run(decoder, embeds[b:b + 1, new], np.array([len(real)]), buffers, names)[0])
        for out, buf in zip(presents, buffers):
            # Back into the case's layout (left padding), so presents compare position by position.
            out[b][:, real] = buf[0, :, : len(real)]
    return [np.stack(logits), *presents]


"""Prefill + greedy decoding over the exported decoder graph, one sequence or a batch.

Two decoder graph forms exist (manifest `lmm.decoder.form`, docs/bundle.md); `make_decoder` picks
the class:

- `flat_kv` (`Decoder`, here): inputs_embeds B x S x hidden, attention_mask B x (P + S),
  position_ids B x S and the 2L past tensors B x kv_heads x P x head_dim -> the last position's
  logits B x V and the 2L present tensors (P + S long, a new cache every call). The presents of
  one call are bound, as OrtValues on the backend's device, as the pasts of the next: on a GPU
  provider the cache never visits host memory; only the logits come back each step.
- `gqa` (runtime/kv_buffer.BufferDecoder): one pre-allocated KV buffer, written in place.

Greedy decoding of several sequences at once (`greedy_batch`, the serving path): each sequence is
prefilled alone (so the per-image prefix cache still applies), then all are decoded together, one
token per sequence per step. The gqa form runs every row in one call (per-row lengths, no
padding). The flat_kv form runs the rows whose caches have the same length in one call, and one
call per other length in the same step: left padding to a common length would change the order in
which the attention softmax sums its terms, so the last bits of the logits, and an answer would
no longer be exactly what it is alone (measured on the demo bundle: a point 6e-5 px off). A
sequence stops after an eos token (kept in `token_ids`, as transformers'
generate() does), at its own `max_new_tokens`, or when its `on_token` callback raises (the
exception is kept in its `DecodeResult.error`; the other sequences go on). Finished sequences are
dropped from the batch once at least half of its rows are finished (`greedy_loop`).

Longrope decoders (Phi-3; manifest `decoder.original_max_position_embeddings` = n): the graph rotates
a call with the long factors when its largest position is >= n, the short ones otherwise. When a
sequence grows from <= n to > n tokens, the keys cached so far were rotated with the short factors;
the official generate() (modeling_phi3_v.py and transformers' Phi3ForCausalLM.
prepare_inputs_for_generation) then drops the cache and runs the whole sequence again, and so does
`forward` here: a state at or below n keeps the input embeddings of its tokens for that re-run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from octopus_rt.bundle import BundleError
from octopus_rt.manifest_lmm import DecoderGraph
from octopus_rt.runtime.backends import Graph

__all__ = ["KVState", "DecodeResult", "Decoder", "greedy_loop", "make_decoder"]

TokenCallback = Callable[[int], None]


@dataclass
class KVState:
    """A flat_kv cache: `past` holds 2L OrtValues (1 x kv_heads x length x head_dim) in the graph's
    input order (layer 0 key, layer 0 value, ...); `length` = P. Never mutated once built (every
    call returns new presents), so one prefix state can seed any number of questions.
    `inputs`: the 1 x s x hidden input embeddings of every call so far, kept only by a longrope
    decoder while length <= its switch (module docstring)."""

    past: list[Any]
    length: int
    inputs: tuple[np.ndarray, ...] = ()


@dataclass
class DecodeResult:
    """token_ids: generated ids (eos included when emitted). axis_logits: raw logits (V,) float32 of the
    step that emitted each axis' first positional word. step_ms: wall time of each decode call this
    sequence took part in. error: what its on_token callback raised (decoding of it stopped there)."""

    token_ids: list[int]
    axis_logits: dict[str, np.ndarray] = field(default_factory=dict)
    step_ms: list[float] = field(default_factory=list)
    error: BaseException | None = None


def greedy_loop(
    step: Callable[[np.ndarray, np.ndarray], np.ndarray],
    logits: np.ndarray,
    limits: Sequence[int],
    eos_ids: Sequence[int],
    axis_ids: dict[int, str] | None = None,
    on_token: Sequence[TokenCallback | None] | None = None,
) -> list[DecodeResult]:
    """Greedy decoding of B sequences from their prefill logits (B x V).

    step(tokens int64 R, rows int64 R) runs one decode call for the batch rows `rows` (indices into
    the B sequences, increasing; the step implementation drops the others from its state) fed
    `tokens`, and returns their next logits R x V. Rows stay in the call until at least half of the
    call's rows are finished, then the finished ones are dropped (one compaction per halving).
    Sequence b emits at most limits[b] tokens and stops after an eos; on_token[b](token) is called
    as each of its tokens is chosen, and an exception it raises ends sequence b only.
    """
    eos = {int(e) for e in eos_ids}
    axis_ids = axis_ids or {}
    callbacks = list(on_token) if on_token is not None else [None] * len(limits)
    results = [DecodeResult([]) for _ in limits]
    done = np.zeros(len(limits), dtype=bool)
    rows = np.arange(len(limits))  # the sequences in the current call, in order
    while True:
        tokens = np.argmax(logits, axis=-1).astype(np.int64)
        for r, b in enumerate(rows):
            if done[b]:
                continue
            token, result = int(tokens[r]), results[b]
            result.token_ids.append(token)
            axis = axis_ids.get(token)
            if axis is not None and axis not in result.axis_logits:
                result.axis_logits[axis] = np.array(logits[r], dtype=np.float32)
            done[b] = token in eos or len(result.token_ids) >= limits[b]
            if callbacks[b] is not None:
                try:
                    callbacks[b](token)
                except Exception as exc:  # noqa: BLE001 - the callback's failure ends its own sequence only
                    result.error, done[b] = exc, True
        if done.all():
            return results
        if 2 * int(done[rows].sum()) >= len(rows):
            keep = ~done[rows]
            rows, tokens = rows[keep], tokens[keep]
        start = time.perf_counter()
        logits = step(tokens, rows)
        elapsed = (time.perf_counter() - start) * 1000.0
        for b in rows:
            if not done[b]:
                results[b].step_ms.append(elapsed)


class Decoder:
    """Embedding lookup + a flat_kv decoder graph.

    embed_table: V x hidden array (memory-mapped `embed_tokens.npy`). `spec`: the manifest's
    `lmm.decoder` section (num_layers, num_key_value_heads, head_dim, hidden_size).
    """

    def __init__(self, graph: Graph, embed_table: np.ndarray, spec: DecoderGraph) -> None:
        self.graph = graph
        self.embed_table = embed_table
        self.num_layers = spec.num_layers
        self.kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.hidden_size = spec.hidden_size
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        self.present_names = [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        self.rope_switch = spec.original_max_position_embeddings
        self.embeds_dtype = graph.input_types.get("inputs_embeds", np.float32)
        self.past_dtype = graph.input_types.get(self.past_names[0], np.float32) if self.past_names else np.float32

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        """1 x S x hidden embeddings of `token_ids`, in the graph's input dtype."""
        return np.asarray(self.embed_table[np.asarray(token_ids, dtype=np.int64)], dtype=self.embeds_dtype)[None]

    def embed_rows(self, tokens: np.ndarray) -> np.ndarray:
        """B x 1 x hidden embeddings of one token per row."""
        return np.asarray(self.embed_table[np.asarray(tokens, dtype=np.int64)], dtype=self.embeds_dtype)[:, None]

    def empty_state(self, capacity: int | None = None) -> KVState:
        """A cache of length 0 (`capacity`: positions the caller will fill; used by the gqa form)."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.past_dtype)
        return KVState([self.graph.to_device(empty) for _ in self.past_names], 0)

    def fork(self, state: KVState, capacity: int | None = None) -> KVState:
        """A state that may be extended without changing `state` (flat_kv states never change)."""
        return state

    def forward(self, inputs_embeds: np.ndarray, state: KVState) -> tuple[np.ndarray, KVState]:
        """Run S new positions after `state`: returns (logits (V,) float32 of the last one, new state)."""
        inputs_embeds = np.asarray(inputs_embeds, dtype=self.embeds_dtype)
        switch = self.rope_switch
        if switch is not None and 0 < state.length <= switch < state.length + inputs_embeds.shape[1]:
            # Crossing the longrope switch: re-run everything with the long factors (module docstring).
            inputs_embeds = np.concatenate([*state.inputs, inputs_embeds], axis=1)
            state = self.empty_state()
        seq = int(inputs_embeds.shape[1])
        total = state.length + seq
        feeds: dict[str, Any] = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(state.length, total, dtype=np.int64)[None],
        }
        feeds.update(zip(self.past_names, state.past))
        outputs = self.graph.run(feeds, ["logits", *self.present_names])
        logits = np.asarray(outputs[0].numpy()[0], dtype=np.float32)
        kept = (*state.inputs, inputs_embeds) if switch is not None and total <= switch else ()
        return logits, KVState(outputs[1:], total, kept)

    def greedy(
        self,
        logits: np.ndarray,
        state: KVState,
        max_new_tokens: int,
        eos_ids: Sequence[int],
        axis_ids: dict[int, str] | None = None,
        on_token: TokenCallback | None = None,
    ) -> DecodeResult:
        """Greedy decoding of one sequence from its prefill logits (V,) and cache `state`.

        axis_ids: {token id: axis} (closed_set.axis_token_ids); the logits of the step that emits the
        first token of each axis are kept in the result. on_token(token_id) is called as each token
        is chosen (streaming; an exception it raises stops decoding and propagates).
        """
        result = self.greedy_batch([logits], [state], [max_new_tokens], eos_ids, axis_ids, [on_token])[0]
        if result.error is not None:
            raise result.error
        return result

    def greedy_batch(
        self,
        logits: Sequence[np.ndarray],
        states: Sequence[KVState],
        limits: Sequence[int],
        eos_ids: Sequence[int],
        axis_ids: dict[int, str] | None = None,
        on_token: Sequence[TokenCallback | None] | None = None,
    ) -> list[DecodeResult]:
        """Decode B prefilled sequences together (module docstring): rows whose caches have the same
        length share one decoder call per step; each other length gets its own call in the same step.
        When a row of a longrope decoder may cross the switch while decoding, every row runs through
        `forward` instead, which re-runs a row's cache when it crosses (module docstring); rows that stay
        on one side of it decode as any other."""
        switch = self.rope_switch
        if switch is not None and any(s.length <= switch < s.length + n for s, n in zip(states, limits)):
            return self._greedy_rows(logits, states, limits, eos_ids, axis_ids, on_token)
        groups: dict[int, list[int]] = {}
        for b, state in enumerate(states):
            groups.setdefault(state.length, []).append(b)
        calls = []
        for members in groups.values():
            past = (list(states[members[0]].past) if len(members) == 1 else
                    [self.graph.to_device(np.concatenate([states[b].past[k].numpy() for b in members]))
                     for k in range(len(self.past_names))])
            length = states[members[0]].length
            calls.append({"rows": np.array(members), "past": past, "length": length})

        def step(tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
            out: np.ndarray | None = None
            for call in calls:
                where = np.flatnonzero(np.isin(rows, call["rows"]))
                if len(where) == 0:
                    continue
                if len(where) != len(call["rows"]):  # finished rows leave their call
                    keep = np.flatnonzero(np.isin(call["rows"], rows))
                    call["past"] = [self.graph.to_device(np.ascontiguousarray(v.numpy()[keep])) for v in call["past"]]
                    call["rows"] = call["rows"][keep]
                n, length = len(where), call["length"]
                feeds: dict[str, Any] = {
                    "inputs_embeds": self.embed_rows(tokens[where]),
                    "attention_mask": np.ones((n, length + 1), dtype=np.int64),
                    "position_ids": np.full((n, 1), length, dtype=np.int64)}
                feeds.update(zip(self.past_names, call["past"]))
                outputs = self.graph.run(feeds, ["logits", *self.present_names])
                call["past"], call["length"] = outputs[1:], length + 1
                logits_now = np.asarray(outputs[0].numpy(), dtype=np.float32)
                if out is None:
                    out = np.empty((len(rows), logits_now.shape[-1]), dtype=np.float32)
                out[where] = logits_now
            assert out is not None  # greedy_loop calls step with at least one running row
            return out

        first = np.stack([np.asarray(x, dtype=np.float32) for x in logits])
        return greedy_loop(step, first, limits, eos_ids, axis_ids, on_token)

    def _greedy_rows(self, logits, states, limits, eos_ids, axis_ids, on_token) -> list[DecodeResult]:
        """greedy_batch one row per decoder call, each through `forward` (longrope decoders)."""
        rows_state = list(states)

        def step(tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
            out = []
            for token, b in zip(tokens, rows):
                row_logits, rows_state[b] = self.forward(self.embed([int(token)]), rows_state[b])
                out.append(row_logits)
            return np.stack(out)

        first = np.stack([np.asarray(x, dtype=np.float32) for x in logits])
        return greedy_loop(step, first, limits, eos_ids, axis_ids, on_token)


def make_decoder(graph: Graph, embed_table: np.ndarray, spec: DecoderGraph):
    """The decoder class of the manifest's `lmm.decoder.form`: Decoder (flat_kv) or BufferDecoder (gqa)."""
    if spec.form == "gqa":
        from octopus_rt.runtime.kv_buffer import BufferDecoder

        return BufferDecoder(graph, embed_table, spec)
    if spec.form != "flat_kv":
        raise BundleError(f"unknown decoder form {spec.form!r} in the manifest; this runtime knows flat_kv and gqa")
    return Decoder(graph, embed_table, spec)

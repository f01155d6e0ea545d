"""Prefill + greedy decoding over the exported decoder graph, with a KV cache kept as OrtValues.

The decoder graph (docs/bundle.md, "Decoder graph I/O") takes inputs_embeds B x S x hidden,
attention_mask B x (P + S), position_ids B x S and the 2L past tensors B x kv_heads x P x head_dim,
and returns the last position's logits B x V and the 2L present tensors (P + S long). Batch is 1
here. The presents of one call are bound, as OrtValues on the backend's device, as the pasts of the
next: on a GPU provider the cache never visits host memory; only the logits (V floats) are copied
back each step for the argmax and the closed-set probabilities.

Every decode call has sequence length 1 and a past one longer than the call before. Decoding stops
after an eos token (which is kept in `token_ids`, as transformers' generate() does) or after
`max_new_tokens` tokens.

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

from octopus_rt.manifest import DecoderGraph
from octopus_rt.runtime.backends import Graph

__all__ = ["KVState", "DecodeResult", "Decoder"]


@dataclass
class KVState:
    """A decoder cache: `past` holds 2L OrtValues (1 x kv_heads x length x head_dim) in the graph's
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
    step that emitted each axis' first positional word. step_ms: wall time of each decode call."""

    token_ids: list[int]
    axis_logits: dict[str, np.ndarray] = field(default_factory=dict)
    step_ms: list[float] = field(default_factory=list)


class Decoder:
    """Embedding lookup + the decoder graph.

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

    def empty_state(self) -> KVState:
        """A cache of length 0."""
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.past_dtype)
        return KVState([self.graph.to_device(empty) for _ in self.past_names], 0)

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
        on_token: Callable[[int], None] | None = None,
    ) -> DecodeResult:
        """Greedy decoding from the prefill's last logits (V,) and cache `state`.

        axis_ids: {token id: axis} (closed_set.axis_token_ids); the logits of the step that emits the
        first token of each axis are kept in the result. on_token(token_id) is called as each token
        is chosen (streaming; an exception it raises stops decoding and propagates).
        """
        eos = {int(e) for e in eos_ids}
        axis_ids = axis_ids or {}
        result = DecodeResult([])
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            result.token_ids.append(token)
            if on_token is not None:
                on_token(token)
            axis = axis_ids.get(token)
            if axis is not None and axis not in result.axis_logits:
                result.axis_logits[axis] = logits
            if token in eos or step == max_new_tokens - 1:
                break
            start = time.perf_counter()
            logits, state = self.forward(self.embed([token]), state)
            result.step_ms.append((time.perf_counter() - start) * 1000.0)
        return result

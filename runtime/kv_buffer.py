"""The gqa-form decoder: a pre-allocated KV buffer that past and present share, written in place.

The gqa graph (docs/bundle.md, "Decoder graph I/O", form gqa) takes inputs_embeds B x S x hidden,
seqlens_k int32 B (valid cache length after the call, minus one), total_sequence_length int32 and
2L buffers B x kv_heads x M x head_dim. Binding the same OrtValue as past input and present output
makes onnxruntime's GroupQueryAttention write only the S new positions of each row into it
(`past_present_share_buffer`), instead of the flat_kv form's Concat of a whole new cache per step.

A `BufferState` is (buffers, length): positions [0, length) hold the sequence's keys and values.
A call writes positions [length, length + S) only, so a state stays valid as a prefix for as long
as nobody extends *that same buffer*; `fork` copies a state into a fresh buffer for that (the
runtime forks the cached per-image prefix before every question, so cached values are never
written). Buffers live in host memory: this form runs on the CPU provider
(runtime/provider_plan.GQA_ON_CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from octopus_rt.runtime import providers
from octopus_rt.runtime.generate import DecodeResult, Decoder, TokenCallback, greedy_loop

__all__ = ["BufferState", "BufferDecoder"]

# Extra positions allocated when a buffer must grow, so that decoding does not regrow every step.
_GROWTH = 64


@dataclass
class BufferState:
    """buffers: 2L float32 arrays rows x kv_heads x capacity x head_dim (graph input order);
    length: valid positions (of the one row of a single-sequence state)."""

    buffers: list[np.ndarray]
    length: int

    @property
    def capacity(self) -> int:
        return int(self.buffers[0].shape[2]) if self.buffers else 0


class BufferDecoder(Decoder):
    """Embedding lookup + a gqa-form decoder graph over shared KV buffers (Decoder's API)."""

    def __init__(self, graph, embed_table: np.ndarray, spec) -> None:
        super().__init__(graph, embed_table, spec)
        self.past_dtype = np.float32
        self._binding: tuple[int, Any, list[np.ndarray]] | None = None

    def _alloc(self, rows: int, capacity: int) -> list[np.ndarray]:
        shape = (rows, self.kv_heads, max(1, int(capacity)), self.head_dim)
        return [np.zeros(shape, dtype=self.past_dtype) for _ in self.past_names]

    def empty_state(self, capacity: int | None = None) -> BufferState:
        return BufferState(self._alloc(1, capacity or _GROWTH), 0)

    def fork(self, state: BufferState, capacity: int | None = None) -> BufferState:
        """A copy of `state` in a new buffer of at least `capacity` positions."""
        buffers = self._alloc(1, max(int(capacity or 0), state.length + 1))
        for new, old in zip(buffers, state.buffers):
            new[:, :, : state.length] = old[:, :, : state.length]
        return BufferState(buffers, state.length)

    def run_buffers(self, embeds: np.ndarray, lengths: np.ndarray, buffers: list[np.ndarray]) -> np.ndarray:
        """One decoder call: embeds rows x S x hidden, lengths (rows,) the valid positions of each row
        after it, buffers the 2L shared buffers (rows x kv_heads x capacity x head_dim, written in
        place). Returns the logits rows x V of each row's last new position."""
        ort = providers.ort()
        if self._binding is None or self._binding[0] != id(buffers[0]):
            # The 2L buffer bindings are made once per buffer set; each call rebinds the small inputs.
            binding = self.graph.session.io_binding()
            binding.bind_output("logits")  # first: get_outputs() follows the binding order
            for name, present, buffer in zip(self.past_names, self.present_names, buffers):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(present, value)
            self._binding = (id(buffers[0]), binding, buffers)  # buffers kept alive with their binding
        binding = self._binding[1]
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.embeds_dtype))
        binding.bind_cpu_input("seqlens_k", (np.asarray(lengths) - 1).astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(int(np.max(lengths)), dtype=np.int32))
        self.graph.session.run_with_iobinding(binding)
        # A copy: the reused binding's output memory is rewritten by the next call.
        return np.array(binding.get_outputs()[0].numpy(), dtype=np.float32, copy=True)

    def forward(self, inputs_embeds: np.ndarray, state: BufferState) -> tuple[np.ndarray, BufferState]:
        """Run S new positions after `state` (written into its buffer, grown by a copy when full)."""
        total = state.length + int(inputs_embeds.shape[1])
        if total > state.capacity:
            state = self.fork(state, total + _GROWTH)
        logits = self.run_buffers(inputs_embeds, np.array([total]), state.buffers)
        return np.asarray(logits[0], dtype=np.float32), BufferState(state.buffers, total)

    def greedy_batch(
        self,
        logits: Sequence[np.ndarray],
        states: Sequence[BufferState],
        limits: Sequence[int],
        eos_ids: Sequence[int],
        axis_ids: dict[int, str] | None = None,
        on_token: Sequence[TokenCallback | None] | None = None,
    ) -> list[DecodeResult]:
        """Decode B prefilled sequences together: each row keeps its own length, no padding."""
        lengths = np.array([s.length for s in states], dtype=np.int64)
        capacity = int(lengths.max()) + int(max(limits))  # at most max(limits) - 1 decode calls
        if len(states) == 1 and states[0].capacity >= capacity:
            buffers = states[0].buffers
        else:
            buffers = self._alloc(len(states), capacity)
            for b, state in enumerate(states):
                for new, old in zip(buffers, state.buffers):
                    new[b, :, : state.length] = old[0, :, : state.length]
        current = {"lengths": lengths, "buffers": buffers, "rows": np.arange(len(states))}

        def step(tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
            if len(rows) != len(current["rows"]):
                keep = np.searchsorted(current["rows"], rows)
                current["buffers"] = [np.ascontiguousarray(buffer[keep]) for buffer in current["buffers"]]
                current["lengths"], current["rows"] = current["lengths"][keep], rows
            current["lengths"] = current["lengths"] + 1
            return self.run_buffers(self.embed_rows(tokens), current["lengths"], current["buffers"])

        first = np.stack([np.asarray(x, dtype=np.float32) for x in logits])
        return greedy_loop(step, first, limits, eos_ids, axis_ids, on_token)

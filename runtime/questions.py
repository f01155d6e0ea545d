"""One question on its way through `Octopus.ask` / `Octopus.ask_batch` (runtime/api.py).

`Question.resolve` checks a question's `AskOptions` against the bundle's defaults (manifest
`defaults`) before any work; the prefill then fills in `prompt` (the image's pending read, the
prompt ids, the last logits and the KV state) and the decode's `DecodeResult` is turned into an
`Answer` by the API. `timings` assembles `Answer.timings_ms` from the question's own stage timer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from octopus_rt.errors import InputError
from octopus_rt.manifest import Defaults
from octopus_rt.runtime.closed_set import POINT_MAPPINGS
from octopus_rt.runtime.images import ImageInput
from octopus_rt.runtime.profiling import StageTimer
from octopus_rt.runtime.results import AskOptions
from octopus_rt.runtime.streaming import TextStream

__all__ = ["Question"]


@dataclass
class Question:
    """image, question and options as asked; tau, mapping, limit, multimask resolved (limit is
    lowered to what the context leaves once the prompt is known); timer / cached: its stages and the
    per-image results it reused; load_before: the backend's session-creation time when it started."""

    image: ImageInput
    question: str
    options: AskOptions
    tau: float
    mapping: str
    limit: int
    multimask: bool
    load_before: float = 0.0
    timer: StageTimer = field(default_factory=StageTimer)
    cached: list[str] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    prompt: dict[str, Any] = field(default_factory=dict)  # pending, ids, logits, state, entry, rgb
    stream: TextStream | None = None

    @classmethod
    def resolve(cls, image: ImageInput, question: str, options: AskOptions, defaults: Defaults,
                load_before: float = 0.0) -> "Question":
        """None options take the defaults; InputError for a value out of range."""
        tau = float(defaults.tau if options.tau is None else options.tau)
        if not tau > 0:
            raise InputError(f"tau must be > 0, got {tau}")
        mapping = options.point_mapping or defaults.point_mapping
        if mapping not in POINT_MAPPINGS:
            raise InputError(f"unknown point mapping {mapping!r}; choose one of {', '.join(POINT_MAPPINGS)}")
        limit = int(defaults.max_new_tokens if options.max_new_tokens is None else options.max_new_tokens)
        if limit < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {limit}")
        multimask = bool(defaults.multimask if options.multimask is None else options.multimask)
        return cls(image, question, options, tau, mapping, limit, multimask, load_before=load_before)

    def timings(self, load_ms: float, step_ms: list[float]) -> dict[str, float]:
        """Stage times, session creation inside this call (`load_sessions`, when the backend's total
        `load_ms` grew), the median decode step and the total since the question started."""
        timings = dict(self.timer.ms)
        if load_ms > self.load_before:
            # Lazy session creation happened inside this call (first use of a graph); it is part of
            # "total" and shown separately; sessions are created outside the stage timers.
            timings["load_sessions"] = load_ms - self.load_before
        if step_ms:
            timings["decode_per_token"] = float(np.median(step_ms))
        timings["total"] = (time.perf_counter() - self.start) * 1000.0
        return timings

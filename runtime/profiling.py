"""Stage timing of the runtime's calls and the merged profile trace (`Octopus.end_profiling(path)`).

`StageTimer` collects per-stage wall times (the `timings_ms` of every result) and the spans behind
them. `write_chrome_trace` merges onnxruntime's per-node profiles (Chrome trace JSON: a list of
events, one file per session) with those stage spans, put on a track of their own
("octopus-rt stages", times in microseconds from the first stage), into one file that
chrome://tracing or https://ui.perfetto.dev opens.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["StageTimer", "stage_trace_events", "write_chrome_trace"]


class StageTimer:
    """Per-stage wall times in milliseconds (a stage run twice accumulates) and the spans:
    `events` holds (stage, start time.perf_counter() seconds, duration seconds)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.events: list[tuple[str, float, float]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, start, time.perf_counter() - start)

    def record(self, name: str, start: float, seconds: float) -> None:
        """Add a span timed elsewhere (e.g. a decode shared by a batch of questions)."""
        self.ms[name] = self.ms.get(name, 0.0) + seconds * 1000.0
        self.events.append((name, start, seconds))


def stage_trace_events(spans: Iterable[tuple[str, float, float]]) -> list[dict[str, Any]]:
    """Chrome trace "complete" events ("ph": "X") of stage spans, microseconds from the first span."""
    spans = list(spans)
    origin = min((start for _, start, _ in spans), default=0.0)
    return [
        {"name": name, "cat": "octopus_stage", "ph": "X", "pid": "octopus-rt stages", "tid": 0,
         "ts": round((start - origin) * 1e6, 3), "dur": round(duration * 1e6, 3)}
        for name, start, duration in spans
    ]


def write_chrome_trace(
    path: str | os.PathLike[str], ort_files: Iterable[str | os.PathLike[str]], spans: Iterable[tuple[str, float, float]]
) -> Path:
    """Write onnxruntime's profile events (an unreadable file is skipped) and the stage spans to
    `path` as one Chrome trace; returns the path."""
    events: list[dict[str, Any]] = []
    for file in ort_files:
        try:
            events.extend(json.loads(Path(file).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    events.extend(stage_trace_events(spans))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(events), encoding="utf-8")
    return path

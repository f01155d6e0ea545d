"""Prometheus metrics of one server (one registry per app, so several apps in one process, as in
tests, never share counters). Served as text at GET /metrics.

| metric | labels | what |
|---|---|---|
| octopus_requests_total | endpoint, status | HTTP requests answered (499: the client left first) |
| octopus_request_seconds | endpoint | wall time from request to response (streaming: to the last chunk) |
| octopus_stage_seconds | stage | the pipeline's stages (`Answer.timings_ms`: vision, prefill, decode, sam_encoder, ...) plus queue_wait |
| octopus_queue_depth | – | requests waiting for the model |
| octopus_batch_size | – | requests handed to `Octopus.ask_batch` at once |
| octopus_image_cache_hits_total | part | per-image cache hits (vision, prefix, sam_embedding) |
| octopus_generated_tokens_total, octopus_prompt_tokens_total | – | tokens generated / prompt tokens (image tokens included) |
"""

from __future__ import annotations

from typing import Any

__all__ = ["Metrics", "ENDPOINTS"]

ENDPOINTS = ("/v1/chat/completions", "/v1/ground", "/v1/score", "/v1/choose", "/v1/models", "/health", "/ready",
             "/metrics")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("octopus_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("octopus_request_seconds", "request wall time", ["endpoint"], buckets=_SECONDS,
                                 registry=r)
        self.stage = Histogram("octopus_stage_seconds", "pipeline stage wall time", ["stage"], buckets=_SECONDS,
                               registry=r)
        self.queue_depth = Gauge("octopus_queue_depth", "requests waiting for the model", registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram("octopus_batch_size", "requests per ask_batch call",
                                    buckets=[s for s in sizes if s <= max_batch], registry=r)
        self.cache_hits = Counter("octopus_image_cache_hits", "per-image cache hits", ["part"], registry=r)
        self.generated = Counter("octopus_generated_tokens", "tokens generated", registry=r)
        self.prompt = Counter("octopus_prompt_tokens", "prompt tokens (image tokens included)", registry=r)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"  # bounded label set: no path from a request
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def answer(self, answer: Any) -> None:
        """Stage times, cache hits and token counts of one `Answer` (or Score/ChoiceResult: stages only)."""
        for stage, ms in getattr(answer, "timings_ms", {}).items():
            if stage not in ("total", "decode_per_token"):
                self.stage.labels(stage).observe(ms / 1000.0)
        for part in getattr(answer, "cached", ()) or ():
            self.cache_hits.labels(part).inc()
        if hasattr(answer, "token_ids"):
            self.generated.inc(len(answer.token_ids))
            self.prompt.inc(int(answer.prompt_tokens))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

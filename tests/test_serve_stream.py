"""`octopus-rt serve` streaming cancellation (issue 15): a client that closes an SSE stream, or a stream
past `--timeout`, stops its decode at the next token and leaves the server answering.

A wrapped `Octopus` holds each answer after its first text until the test releases it, so "stopped
early" is observed from the tokens decoded and the `ask_batch` result, never from a clock.
"""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from fixtures_serve import DEMO, EXAMPLES, QUESTION, chat_body, running, wait_until  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from octopus_rt.runtime.api import Octopus  # noqa: E402
from octopus_rt.runtime.serve.app import ServeSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def reference() -> Octopus:
    return Octopus(DEMO, threads=1)


@pytest.fixture
def own_model() -> Octopus:
    return Octopus(DEMO, threads=1)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class _Held:
    """An `Octopus` whose `ask_batch` holds each answer after its first text until `gate` is set
    (30 s at most), counting the tokens decoded; `results` keeps what `ask_batch` returned."""

    def __init__(self, model: Octopus) -> None:
        self._model, self.gate, self.tokens, self.results = model, threading.Event(), 0, None

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def ask_batch(self, images, questions, options):
        import dataclasses

        def held(hook):
            def on_token(delta: str) -> None:
                self.tokens += 1
                hook(delta)  # the server's hook: raises once the job is cancelled
                if delta and not self.gate.is_set():
                    self.gate.wait(30)
            return on_token

        options = [dataclasses.replace(o, on_token=held(o.on_token)) for o in options]
        self.results = self._model.ask_batch(images, questions, options)
        return self.results


def _stream_body(**extra) -> dict:
    return {**chat_body(EXAMPLES[0].read_bytes()), "stream": True, "max_tokens": 24, **extra}


def test_client_leaving_mid_stream_stops_the_decode(own_model, reference):
    from octopus_rt.runtime.serve.batching import Cancelled

    full = reference.ask(EXAMPLES[0], QUESTION, max_new_tokens=24, segment=False)
    assert len(full.token_ids) > 3  # so a decode run to its end is told apart from one stopped early
    held = _Held(own_model)
    app = create_app(held, ServeSettings())
    with running(app) as url:
        try:
            with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/chat/completions",
                                                               json=_stream_body()) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                while '"content": ""' in (line := next(lines)) or not line.startswith("data:"):
                    pass  # the role chunk; then the first text chunk arrives while the decode is held
                assert json.loads(line[5:])["choices"][0]["delta"]["content"]
            # the connection is closed here, mid-stream
            wait_until(lambda: _metrics(url).get(
                ("octopus_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "499")))) == 1.0,
                what="the server to see the client leave")
        finally:
            held.gate.set()
        wait_until(lambda: held.results is not None, what="the held decode to end")
        assert isinstance(held.results[0], Cancelled)
        assert held.tokens < len(full.token_ids)  # stopped at its next token, not decoded to the end
        after = httpx.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[0].read_bytes()), timeout=60)
        assert after.status_code == 200 and app.state.batcher.depth == 0


def test_timeout_mid_stream_ends_with_an_error_event_and_stops_the_decode(own_model, reference):
    from octopus_rt.runtime.serve.batching import Cancelled

    full = reference.ask(EXAMPLES[0], QUESTION, max_new_tokens=24, segment=False)
    held = _Held(own_model)
    app = create_app(held, ServeSettings(timeout=3.0))
    with running(app) as url:
        try:
            with httpx.Client(timeout=60) as http:
                response = http.post(url + "/v1/chat/completions", json=_stream_body())
        finally:
            held.gate.set()
        assert response.status_code == 200  # the stream had started: its status was sent with the first text
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        assert json.loads(events[1])["choices"][0]["delta"]["content"]
        wait_until(lambda: held.results is not None, what="the held decode to end")
        assert isinstance(held.results[0], Cancelled) and held.tokens < len(full.token_ids)
        assert httpx.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[0].read_bytes()),
                          timeout=60).status_code == 200

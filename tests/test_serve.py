"""`octopus-rt serve` end to end: a real uvicorn server on 127.0.0.1, the official OpenAI client and httpx.

The demo bundle (shipped in the package, tiny LLaVA + tiny SAM) keeps each answer at a few tens of
milliseconds; expected values come from a separate `Octopus` and from `octopus-rt infer --json`.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from fixtures_serve import DEMO, EXAMPLES, QUESTION, chat_body, data_url, running, wait_until  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from octopus_rt.cli import main  # noqa: E402
from octopus_rt.runtime.api import Octopus  # noqa: E402
from octopus_rt.runtime.serve.app import ServeSettings, create_app  # noqa: E402
from octopus_rt.runtime.serve.batching import Job  # noqa: E402

QUESTIONS = (QUESTION, "What distortion affects the top left region?", "Describe the quality of this image.")
LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def reference() -> Octopus:
    return Octopus(DEMO, threads=1)


@pytest.fixture(scope="module")
def served():
    """(base URL, app) of the module's server: max batch 4, queue 16, body limit 2 MiB."""
    app = create_app(Octopus(DEMO, threads=1),
                     ServeSettings(max_batch=4, max_queue=16, timeout=60, max_body_bytes=LIMIT, model_name="demo"))
    with running(app) as url:
        yield url, app


@pytest.fixture
def own_model() -> Octopus:
    """A model for a test's own server (the module server's worker owns the other one)."""
    return Octopus(DEMO, threads=1)


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _png_mask(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))) > 127


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _gate(app) -> threading.Event:
    """Occupy the worker with a job that waits for the returned event (set it to release)."""
    gate = threading.Event()
    job = app.state.batcher.submit(Job("call", fn=lambda _m: gate.wait(30)))
    wait_until(lambda: job.future.running(), what="the gate job to start")
    return gate


def test_chat_equals_infer_and_ask(served, reference, tmp_path, capsys):
    url, _ = served
    client = _client(url)
    for image in EXAMPLES[:3]:
        completion = client.chat.completions.create(
            model="demo", messages=chat_body(image.read_bytes())["messages"], extra_body={"grounding": {"mask": True}})
        mask_file = tmp_path / f"{image.stem}-mask.png"
        assert main(["infer", str(image), QUESTION, "--bundle", str(DEMO), "--json", "--mask", str(mask_file),
                     "--threads", "1"]) == 0
        record = json.loads(capsys.readouterr().out)
        grounding = completion.model_extra["grounding"]
        assert completion.choices[0].message.content == record["text"] == reference.ask(image, QUESTION).text
        for key in ("point", "probs", "whole_image", "mask_iou", "image_size"):
            assert grounding[key] == record[key], key
        if record["mask"] is None:
            assert grounding["mask"] is None
        else:
            assert np.array_equal(_png_mask(grounding["mask"]), np.asarray(Image.open(mask_file)) > 127)
        assert completion.usage.completion_tokens == len(record["token_ids"])
        assert completion.choices[0].finish_reason == ("stop" if record["token_ids"][-1] in reference.eos_ids else "length")
        assert completion.model == "demo" and completion.object == "chat.completion"


def test_stream_equals_non_stream(served):
    url, _ = served
    client = _client(url)
    messages = chat_body(EXAMPLES[1].read_bytes(), QUESTIONS[1])["messages"]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=24)
    parts, finals, usage = [], [], None
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_tokens=24, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                finals.append(chunk)
        usage = chunk.usage or usage
    assert len(parts) > 2 and "".join(parts) == whole.choices[0].message.content
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finals[0].model_extra["grounding"] == whole.model_extra["grounding"]
    assert usage.completion_tokens == whole.usage.completion_tokens <= 24
    # The wire format itself: SSE data lines, chunk objects, [DONE] last.
    with httpx.stream("POST", url + "/v1/chat/completions", json={**chat_body(EXAMPLES[1].read_bytes()), "stream": True},
                      timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert {json.loads(line[6:])["object"] for line in lines[:-1]} == {"chat.completion.chunk"}


def test_concurrent_requests_equal_sequential(served, reference):
    url, _ = served
    items = [(EXAMPLES[i % len(EXAMPLES)], QUESTIONS[i % len(QUESTIONS)]) for i in range(12)]
    expected = [reference.ask(image, question, segment=False) for image, question in items]
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(
            lambda item: http.post(url + "/v1/chat/completions", json=chat_body(item[0].read_bytes(), item[1])), items))
    for response, answer in zip(responses, expected):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"]["content"] == answer.text
        assert body["grounding"]["point"] == (None if answer.point is None else list(answer.point))


def test_queued_requests_are_batched_and_one_bad_item_fails_alone(served, reference):
    url, app = served
    before = _metrics(url)
    gate = _gate(app)
    items = [(EXAMPLES[i], QUESTIONS[i % 3]) for i in range(4)] + [(EXAMPLES[1], QUESTIONS[2])]
    bodies = [chat_body(image.read_bytes(), question) for image, question in items]
    bodies.insert(4, {**chat_body(EXAMPLES[0].read_bytes()), "grounding": {"point_mapping": "bogus"}})
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(http.post, url + "/v1/chat/completions", json=body) for body in bodies]
        wait_until(lambda: app.state.batcher.depth == len(bodies), what="six queued requests")
        gate.set()
        responses = [future.result() for future in futures]
    after = _metrics(url)
    batches = after[("octopus_batch_size_count", ())] - before.get(("octopus_batch_size_count", ()), 0)
    asked = after[("octopus_batch_size_sum", ())] - before.get(("octopus_batch_size_sum", ()), 0)
    assert (batches, asked) == (2, 6)  # max batch 4: one batch of 4, then one of 2
    bad = responses.pop(4)
    assert bad.status_code == 400 and "point mapping" in bad.json()["error"]["message"]
    for response, (image, question) in zip(responses, items):
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == reference.ask(image, question).text


def test_ground_score_choose_equal_the_api(served, reference, tmp_path, capsys):
    url, _ = served
    image = EXAMPLES[2]
    data = image.read_bytes()
    assert main(["infer", str(image), QUESTION, "--bundle", str(DEMO), "--json", "--mask", str(tmp_path / "m.png"),
                 "--threads", "1"]) == 0
    record = json.loads(capsys.readouterr().out)
    as_json = httpx.post(url + "/v1/ground", json={"image": data_url(data), "question": QUESTION, "mask": True},
                         timeout=60).json()
    as_form = httpx.post(url + "/v1/ground", files={"image": ("x.png", data, "image/png")},
                         data={"question": QUESTION, "mask": "true"}, timeout=60).json()
    for result in (as_json, as_form):
        assert set(result) == set(record)
        for key in ("text", "token_ids", "point", "probs", "whole_image", "mask_iou", "mask_area", "image_size"):
            assert result[key] == record[key], key
        if record["mask"] is not None:
            assert np.array_equal(_png_mask(result["mask"]), np.asarray(Image.open(tmp_path / "m.png")) > 127)
    score = httpx.post(url + "/v1/score", json={"image": data_url(data)}, timeout=60).json()
    expected = reference.score(image)
    assert score["score"] == expected.score and score["probs"] == expected.probs
    choice = httpx.post(url + "/v1/choose", files={"image": ("x.png", data)},
                        data={"question": "Is the image blurry?", "options": ["yes", "no"]}, timeout=60).json()
    expected = reference.choose(image, "Is the image blurry?", ["yes", "no"])
    assert (choice["letter"], choice["option"], choice["probs"]) == (expected.letter, expected.option, expected.probs)


def _bomb() -> bytes:
    """A 9000 x 8000 (72 megapixel) 1-bit PNG of a few kB: over the runtime's 64 MP limit."""
    buffer = io.BytesIO()
    Image.new("1", (9000, 8000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_input_gets_4xx_and_the_server_stays_healthy(served):
    url, _ = served
    png = EXAMPLES[0].read_bytes()
    good = chat_body(png)
    content = good["messages"][0]["content"]
    with_url = lambda image_url: {"messages": [{"role": "user", "content": [content[0], {"type": "image_url", "image_url": {"url": image_url}}]}]}  # noqa: E731
    chat_cases = {
        "not json": (b"{not json", 400),
        "not an object": (b"[1, 2]", 400),
        "no messages": ({"model": "demo"}, 400),
        "text only": ({"messages": [{"role": "user", "content": QUESTION}]}, 400),
        "http url": (with_url("https://example.com/x.png"), 400),
        "file url": (with_url("file:///etc/passwd"), 400),
        "path": (with_url("/etc/passwd"), 400),
        "garbage base64": (with_url("data:image/png;base64,!!!notbase64"), 400),
        "not base64 flagged": (with_url("data:image/png," + "A" * 8), 400),
        "not an image": (with_url(data_url(b"hello world, not an image")), 400),
        "truncated png": (with_url(data_url(png[: len(png) // 2])), 400),
        "decompression bomb": (with_url(data_url(_bomb())), 400),
        "two images": ({"messages": [{"role": "user", "content": [*content, content[1]]}]}, 400),
        "system turn": ({"messages": [{"role": "system", "content": "be brief"}, *good["messages"]]}, 400),
        "empty question": (chat_body(png, "   "), 400),
        "over-long question": (chat_body(png, "why " * 1100), 400),
        "temperature": ({**good, "temperature": 0.7}, 400),
        "top_p": ({**good, "top_p": 0.5}, 400),
        "n": ({**good, "n": 2}, 400),
        "unknown field": ({**good, "colour": "blue"}, 400),
        "max_tokens 0": ({**good, "max_tokens": 0}, 400),
        "max_tokens text": ({**good, "max_tokens": "ten"}, 400),
        "grounding unknown": ({**good, "grounding": {"masks": True}}, 400),
        "grounding mask type": ({**good, "grounding": {"mask": "yes"}}, 400),
        "oversized body": (b"x" * (LIMIT + 1), 413),
        "oversized chunked body": (iter([b"x" * 65536] * (LIMIT // 65536 + 2)), 413),
    }
    with httpx.Client(timeout=60) as http:
        for name, (body, status) in chat_cases.items():
            kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
            response = http.post(url + "/v1/chat/completions", **kwargs)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"] and error["code"], name
        other_cases = [
            ("post", "/v1/ground", {"json": {"image": data_url(png)}}, 400),  # no question
            ("post", "/v1/ground", {"json": {"image": data_url(png), "question": QUESTION, "colour": 1}}, 400),
            ("post", "/v1/ground", {"files": {"image": ("e.png", b"")}, "data": {"question": QUESTION}}, 400),
            ("post", "/v1/ground", {"json": {"image": "/etc/passwd", "question": QUESTION}}, 400),
            ("post", "/v1/ground", {"files": {"image": ("e.png", png), "question": ("q.txt", b"hi")}}, 400),
            ("post", "/v1/ground", {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400),
            ("post", "/v1/choose", {"json": {"image": data_url(png), "question": "ok?", "options": list("abcdef")}}, 400),
            ("post", "/v1/choose", {"json": {"image": data_url(png), "question": "ok?"}}, 400),
            ("post", "/v1/score", {"json": {"image": data_url(b"GIF89a-broken")}}, 400),
            ("get", "/v1/chat/completions", {}, 405),
            ("get", "/v1/nothing-here", {}, 404),
        ]
        for method, path, kwargs, status in other_cases:
            response = http.request(method.upper(), url + path, **kwargs)
            assert response.status_code == status, (path, kwargs.keys(), response.text)
            assert response.json()["error"]["message"]
        assert http.get(url + "/health").json() == {"status": "ok"}
        assert http.get(url + "/ready").status_code == 200
        assert http.post(url + "/v1/chat/completions", json=good).status_code == 200


def test_api_key(own_model):
    with running(create_app(own_model, ServeSettings(api_key="s3cret"))) as url:
        body = chat_body(EXAMPLES[0].read_bytes())
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
        wrong = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            _client(url, "nope").chat.completions.create(model="demo", messages=body["messages"])
        assert _client(url, "s3cret").chat.completions.create(model="demo", messages=body["messages"]).choices
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200


def test_full_queue_answers_429_with_retry_after(own_model):
    app = create_app(own_model, ServeSettings(max_batch=1, max_queue=1))
    with running(app) as url, httpx.Client(timeout=60) as http, ThreadPoolExecutor(1) as pool:
        gate = _gate(app)
        waiting = pool.submit(http.post, url + "/v1/chat/completions", json=chat_body(EXAMPLES[0].read_bytes()))
        wait_until(lambda: app.state.batcher.depth == 1, what="one queued request")
        refused = http.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[1].read_bytes()))
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        gate.set()
        assert waiting.result().status_code == 200
        assert http.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[1].read_bytes())).status_code == 200


def test_timeout_answers_504_and_frees_the_slot(own_model):
    app = create_app(own_model, ServeSettings(timeout=0.5))
    with running(app) as url, httpx.Client(timeout=60) as http:
        gate = _gate(app)
        late = http.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[0].read_bytes()))
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        late = http.post(url + "/v1/chat/completions", json={**chat_body(EXAMPLES[0].read_bytes()), "stream": True})
        assert late.status_code == 504  # no token before the deadline: a plain error, not a stream
        assert app.state.batcher.depth == 0
        gate.set()
        assert http.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[0].read_bytes())).status_code == 200


def test_client_disconnect_frees_its_slot(own_model):
    app = create_app(own_model, ServeSettings())
    with running(app) as url:
        gate = _gate(app)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[0].read_bytes()), timeout=1.0)
        wait_until(lambda: app.state.batcher.depth == 0, what="the abandoned request to leave the queue")
        gate.set()
        wait_until(lambda: _metrics(url).get(
            ("octopus_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "499")))) == 1.0,
            what="the 499 count")


def test_metrics_move(served):
    url, _ = served
    before = _metrics(url)
    buffer = io.BytesIO()  # an image no other test sent, so the first request misses the image cache
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buffer, "PNG")
    body = chat_body(buffer.getvalue(), QUESTIONS[2])
    first = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    httpx.post(url + "/v1/chat/completions", json=body, timeout=60)  # same image again: cache hits
    httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=60)
    after = _metrics(url)
    delta = lambda name, **labels: after.get((name, tuple(sorted(labels.items()))), 0) - before.get(  # noqa: E731
        (name, tuple(sorted(labels.items()))), 0)
    assert delta("octopus_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert delta("octopus_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert delta("octopus_generated_tokens_total") == 2 * first["usage"]["completion_tokens"]
    assert delta("octopus_prompt_tokens_total") == 2 * first["usage"]["prompt_tokens"]
    assert delta("octopus_stage_seconds_count", stage="decode") == 2
    assert delta("octopus_stage_seconds_count", stage="vision") == 1  # the second request reused the features
    assert delta("octopus_image_cache_hits_total", part="prefix") >= 1
    assert delta("octopus_request_seconds_count", endpoint="/v1/chat/completions") == 3
    assert ("octopus_queue_depth", ()) in after


def test_mask_without_sam_is_refused(tmp_path):
    import shutil

    bundle = tmp_path / "no-sam"
    shutil.copytree(DEMO, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["sam"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with running(create_app(Octopus(bundle, threads=1))) as url:
        body = {**chat_body(EXAMPLES[0].read_bytes()), "grounding": {"mask": True}}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["code"] == "mask_unavailable"
        body["grounding"]["mask"] = False
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_lowered_agreement_criteria_are_logged_once_and_shown_in_ready(tmp_path, capsys, caplog):
    """A bundle exported with --min-top1 lowered: the server logs the WARNING line `octopus-rt infer`
    prints, once at start-up, and /ready carries it; the demo bundle (verified at the defaults) has none."""
    import logging
    import shutil

    bundle = tmp_path / "lowered"
    shutil.copytree(DEMO, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["lmm"]["verification"]["overrides"] = {"min_top1": 0.5}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["infer", str(EXAMPLES[0]), QUESTION, "--bundle", str(bundle), "--max-new-tokens", "2"]) == 0
    infer_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(infer_lines) == 1 and "lowered agreement criteria (--min-top1 0.5)" in infer_lines[0]
    with caplog.at_level(logging.WARNING, logger="octopus_rt.serve"):
        with running(create_app(Octopus(bundle, threads=1))) as url:
            ready = httpx.get(url + "/ready", timeout=60)
            httpx.get(url + "/ready", timeout=60)
            assert httpx.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[0].read_bytes()),
                              timeout=60).status_code == 200
    assert ready.status_code == 200 and ready.json()["warning"] == infer_lines[0]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("WARNING")] == infer_lines
    with running(create_app(Octopus(DEMO, threads=1))) as url:
        assert "warning" not in httpx.get(url + "/ready", timeout=60).json()


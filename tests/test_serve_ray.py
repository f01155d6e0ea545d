"""The same app as two Ray Serve replicas on a local Ray instance (ray's own `serve.run`), HTTP on 127.0.0.1.

Starts and stops a local Ray (about 25 s on a 2-core machine) inside the test process.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from fixtures_serve import DEMO, EXAMPLES, QUESTION, chat_body, wait_until  # noqa: E402

from octopus_rt.runtime.api import Octopus  # noqa: E402
from octopus_rt.runtime.serve.ray_app import app_builder  # noqa: E402



def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ray Serve gives its HTTP proxy actor 5 s to report ready and marks it unhealthy after three misses; on a
# loaded 2-core CI machine the proxy can take longer to start, and the fixture then failed with ActorDiedError
# (seen once, load 4). Ray's own settings, read from the environment its processes inherit from ray.init.
_RAY_PATIENCE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@pytest.fixture(scope="module")
def ray_url():
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _RAY_PATIENCE.items():
            patch.setenv(name, value)
        yield from _serve_on_local_ray()


def _serve_on_local_ray():
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", configure_logging=False,
             _node_ip_address="127.0.0.1")  # Ray's own services on loopback too
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # app_builder: the entry point of `serve run` / KubeRay configs (string arguments), which
        # builds the same application as `octopus-rt serve --ray`.
        application = app_builder({"bundle": str(DEMO), "threads": "1", "replicas": "2", "max_batch": "4",
                                   "max_queue": "16", "model_name": "demo"})
        serve.run(application, name="octopus", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_like_the_api(ray_url):
    reference = Octopus(DEMO, threads=1)
    status = serve.status().applications["octopus"].deployments["octopus"]
    assert status.replica_states.get("RUNNING") == 2
    client = openai.OpenAI(base_url=ray_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    completion = client.chat.completions.create(
        model="demo", messages=chat_body(EXAMPLES[0].read_bytes())["messages"], extra_body={"grounding": {"mask": True}})
    expected = reference.ask(EXAMPLES[0], QUESTION)
    assert completion.choices[0].message.content == expected.text
    assert completion.model_extra["grounding"]["point"] == list(expected.point)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="demo", messages=chat_body(EXAMPLES[0].read_bytes())["messages"], stream=True) if chunk.choices)
    assert streamed == expected.text
    items = [(EXAMPLES[i % len(EXAMPLES)], QUESTION) for i in range(12)]
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(
            lambda item: http.post(ray_url + "/v1/chat/completions", json=chat_body(item[0].read_bytes(), item[1])),
            items))
        instances = {response.headers["x-octopus-instance"] for response in responses}
        for response, (image, question) in zip(responses, items):
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == reference.ask(image, question).text
        # Both replicas take traffic (bounded: more concurrent rounds until the second one shows up).
        def both_seen() -> bool:
            rounds = list(pool.map(lambda _: http.get(ray_url + "/health"), range(8)))
            instances.update(r.headers["x-octopus-instance"] for r in rounds)
            return len(instances) == 2
        wait_until(both_seen, timeout_s=30, what="both replicas to answer")
        bad = http.post(ray_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "missing_image"
        assert http.get(ray_url + "/health").status_code == 200

"""The `octopus-rt serve` command: a real process on 127.0.0.1, and a clear error without the extra."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from fixtures_serve import EXAMPLES, chat_body

_BLOCKING_CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"blocked by the test: {{name}}")
            return None

    sys.meta_path.insert(0, Refuse())
    import octopus_rt.runtime, octopus_rt.runtime.serve, octopus_rt.runtime.serve.cli  # importable without them
    from octopus_rt.cli import main

    raise SystemExit(main(sys.argv[1:]))
    """
)


def _blocked(modules: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    child = _BLOCKING_CHILD.format(blocked=set(modules))
    return subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, timeout=120)


def test_serve_without_the_extra_says_what_to_install():
    result = _blocked(("fastapi", "uvicorn", "prometheus_client", "python_multipart"), "serve")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'octopus-rt[serve]'" in lines[0] and "fastapi" in lines[0], result.stderr


def test_serve_ray_without_ray_says_what_to_install():
    result = _blocked(("ray",), "serve", "--ray")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'octopus-rt[ray]'" in lines[0], result.stderr


@pytest.mark.parametrize("flags", [["--max-batch", "0"], ["--autoscale", "3:1"], ["--timeout", "0"], ["--ray", "--port", "0"]])
def test_serve_refuses_bad_flags(flags):
    pytest.importorskip("fastapi")
    from octopus_rt.cli import main

    assert main(["serve", *flags]) == 2


def test_serve_command_answers_and_stops_on_sigterm():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    process = subprocess.Popen(
        [sys.executable, "-m", "octopus_rt.cli", "serve", "--port", "0", "--threads", "1", "--max-batch", "2",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        url, seen, deadline = None, [], time.monotonic() + 120
        while url is None and time.monotonic() < deadline and process.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            match = re.search(r"ready at (http://127\.0\.0\.1:\d+)", seen[-1])
            url = match.group(1) if match else None
        assert url, "".join(seen)
        assert httpx.get(url + "/ready").status_code == 200
        response = httpx.post(url + "/v1/chat/completions", json=chat_body(EXAMPLES[0].read_bytes()), timeout=60)
        assert response.status_code == 200 and response.json()["model"] == "demo"
    finally:
        process.terminate()
        code = process.wait(timeout=60)
    assert code == 0

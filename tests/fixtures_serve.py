"""Helpers of the server tests: a real uvicorn server on a free 127.0.0.1 port, in a thread.

Imported by the test_serve*.py modules (not by conftest: fastapi and uvicorn are the `serve` extra).
"""

from __future__ import annotations

import base64
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "octopus_rt" / "demo" / "bundle"
EXAMPLES = sorted((ROOT / "examples").glob("example_*.png"))
QUESTION = "which region is most degraded?"


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode("ascii")


def chat_body(image: bytes, question: str = QUESTION, **extra) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **extra}


@contextmanager
def running(app, startup_s: float = 120.0):
    """Serve `app` with uvicorn on 127.0.0.1 (port chosen by the system) in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` every 10 ms, at most `timeout_s` seconds (bounded, never a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)

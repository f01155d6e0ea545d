"""The ASGI middleware in front of every route: API key, body-size limit, per-request metrics.

Refusals happen here before a route reads anything: a missing or wrong `Authorization: Bearer KEY`
on /v1/* -> 401; a declared Content-Length above the limit -> 413. A body without Content-Length
(chunked) is counted as it arrives and the read that crosses the limit raises the same 413 inside
the route. Every response is counted by endpoint and status in the metrics; 499 marks a request
whose client left before the answer (nginx's convention).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import time
from typing import Any

from octopus_rt.runtime.serve.schemas import ApiError

__all__ = ["Guard", "CLIENT_GONE"]

log = logging.getLogger("octopus_rt.serve")
CLIENT_GONE = "octopus_client_gone"  # key in scope["state"] set by a route whose client disconnected
INSTANCE = f"{socket.gethostname()}:{os.getpid()}"  # X-Octopus-Instance: which replica answered


async def send_error(send: Any, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """app: the FastAPI app; api_key: None (no auth) or the expected bearer token."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: Any) -> None:
        self.app, self.api_key, self.limit, self.metrics = app, api_key, max_body_bytes, metrics

    def _refusal(self, scope: dict[str, Any]) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return ApiError(400, "invalid Content-Length header", code="invalid_request")
            if declared > self.limit:
                return self.too_large()
        return None

    def too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the limit of {self.limit} bytes (--max-body-mb)",
                        code="request_too_large")

    def _counting(self, receive: Any) -> Any:
        seen = 0

        async def receive_limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self.too_large()
            return message

        return receive_limited

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]  # until the app sends its response start
        state = scope.setdefault("state", {})

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-octopus-instance", INSTANCE.encode())]}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                log.warning("%s %s -> %d %s", scope["method"], scope["path"], refusal.status, refusal.message)
                await send_error(send_counted, refusal)
            else:
                await self.app(scope, self._counting(receive), send_counted)
        finally:
            code = 499 if state.get(CLIENT_GONE) else status[0]
            self.metrics.request(scope["path"], code, time.perf_counter() - start)

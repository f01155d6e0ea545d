"""The FastAPI app of `octopus-rt serve`: a thin HTTP front end over `Octopus` (runtime/api.py).

Routes (docs/serve.md has the request and response formats):
    POST /v1/chat/completions  OpenAI chat completions (+ SSE streaming) with a top-level `grounding`
    POST /v1/ground            the JSON of `octopus-rt infer --json` (JSON body or multipart upload)
    POST /v1/score, /v1/choose `Octopus.score` / `Octopus.choose`
    GET  /v1/models            the served model's id
    GET  /health, /ready, /metrics
Flow of a question: guard (API key, body limit) -> parse (schemas.py, 4xx on bad input) -> room in
the queue? (429 + Retry-After) -> decode the image with the runtime's loader (its pixel limit
refuses decompression bombs) -> queue -> `Octopus.ask_batch` on the worker thread (batching.py)
-> response. A request past `timeout` seconds is cancelled and answered 504; a client that
disconnects has its job cancelled (its queue slot freed, its decoding stopped at the next token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from octopus_rt.errors import InputError, OctopusError
from octopus_rt.runtime.images import load_image
from octopus_rt.runtime.results import AskOptions
from octopus_rt.runtime.serve import schemas
from octopus_rt.runtime.serve.batching import Batcher, Cancelled, Job, QueueFull
from octopus_rt.runtime.serve.guard import CLIENT_GONE, Guard
from octopus_rt.runtime.serve.metrics import Metrics
from octopus_rt.runtime.serve.schemas import ApiError, AskRequest

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("octopus_rt.serve")
_END = object()  # end of a streamed answer


@dataclass(frozen=True)
class ServeSettings:
    """max_batch: questions per `ask_batch` call; max_queue: waiting requests before 429; timeout:
    seconds from arrival to answer before 504; api_key: required bearer token on /v1/* (None: open);
    max_body_bytes: request body limit (413); model_name: the id reported as `model`;
    warmup: create every session (one tiny question) before reporting ready."""

    max_batch: int = 8
    max_queue: int = 64
    timeout: float = 60.0
    api_key: str | None = None
    max_body_bytes: int = 20 * 1024 * 1024
    model_name: str = "octopus"
    warmup: bool = True


class _ClientGone(Exception):
    pass


def _warm_up(model: Any) -> None:
    model.ask(np.full((64, 64, 3), 127, np.uint8), "Which region is most degraded?", max_new_tokens=1, segment=False)
    if model.has_sam:
        model.sam.load()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (uvicorn answers receive() with http.disconnect then)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # another message type: do not spin


def _api_error(exc: BaseException) -> ApiError:
    """The HTTP answer for an exception a model call raised (an item's slot of `ask_batch`)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc), code="invalid_input")
    if isinstance(exc, QueueFull):
        return ApiError(429, f"the server is busy ({exc}); retry later", "rate_limit_error", "queue_full",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, Cancelled):
        return ApiError(503, str(exc), "server_error", "cancelled")
    if isinstance(exc, OctopusError):
        return ApiError(500, str(exc), "server_error", "model_error")
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(model: Any, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The app over a loaded `Octopus`. The worker thread starts (and the sessions are created) in the
    app's lifespan, so the app must run under a server that runs lifespans (uvicorn, Ray Serve)."""
    metrics = Metrics(settings.max_batch)
    batcher = Batcher(model, settings.max_batch, settings.max_queue, metrics)
    ready = {"ok": False}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if model.agreement_warning:  # the line `octopus-rt infer` prints; also in /ready
            log.warning("%s", model.agreement_warning)
        batcher.start()
        if settings.warmup:
            await asyncio.wrap_future(batcher.submit(Job("call", fn=_warm_up)).future)
        ready["ok"] = True
        yield
        ready["ok"] = False
        batcher.stop()

    app = FastAPI(title="octopus-rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    app.state.batcher, app.state.metrics, app.state.model = batcher, metrics, model

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return await on_api_error(request, ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server logs the traceback (once).
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", "server_error",
                                     "internal_error").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await on_api_error(request, ApiError(400, str(exc.errors()), code="invalid_request"))

    # ------------------------------------------------------------------------------- helpers
    deadline_of = lambda: time.monotonic() + settings.timeout  # noqa: E731

    async def race(awaitable: Any, request: Request, deadline: float) -> Any:
        """The awaitable's result, or 504 past the deadline, or _ClientGone when the client leaves."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
        if task in done:
            return task.result()
        if gone in done:
            setattr(request.state, CLIENT_GONE, True)
            raise _ClientGone()
        raise ApiError(504, f"no answer within the server's timeout of {settings.timeout:g} s; the request was "
                            "cancelled", "timeout_error", "timeout")

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from exc

    async def fields(request: Request, allowed: set[str]) -> tuple[bytes, dict[str, Any]]:
        """(image bytes, checked fields) from a JSON body (image: data URL) or a multipart form."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=len(allowed) + 8) as form:
                image = form.get("image")
                data = await image.read() if isinstance(image, UploadFile) else schemas.decode_data_url(image, "image")
                if any(isinstance(v, UploadFile) for k, v in form.multi_items() if k != "image"):
                    raise ApiError(400, "only the image may be a file; other fields are text", code="invalid_type")
                values: dict[str, Any] = {k: v for k, v in form.items() if k != "options"}
                if "options" in form:
                    options = form.getlist("options")
                    if len(options) == 1 and options[0].lstrip().startswith("["):
                        try:
                            options = json.loads(options[0])
                        except ValueError as exc:
                            raise ApiError(400, f"options is not a JSON list ({exc})", param="options") from exc
                    values["options"] = options
            if not data:
                raise ApiError(400, "the image upload is empty", code="invalid_image", param="image")
            return data, schemas.parse_fields(values, allowed, form=True)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return schemas.decode_data_url(body.get("image"), "image"), schemas.parse_fields(body, allowed)

    async def decoded(data: bytes) -> np.ndarray:
        """H x W x 3 uint8 RGB via the runtime's loader (EXIF, modes, pixel limit), off the event loop."""
        try:
            batcher.check_room()
        except QueueFull as exc:
            raise _api_error(exc) from exc
        start = time.perf_counter()
        try:
            rgb = (await run_in_threadpool(load_image, data, max_pixels=model.max_pixels)).rgb
        except InputError as exc:
            raise ApiError(400, str(exc).replace("image bytes", "the image"), code="invalid_image") from exc
        metrics.stage.labels("decode_image").observe(time.perf_counter() - start)
        return rgb

    def submit(job: Job) -> Job:
        try:
            return batcher.submit(job)
        except (QueueFull, Cancelled) as exc:
            raise _api_error(exc) from exc

    async def ask_job(req: AskRequest) -> Job:
        if req.mask and not model.has_sam:
            raise ApiError(400, "this model cannot return a mask: its bundle has no sam section", code="mask_unavailable")
        options = AskOptions(max_new_tokens=req.max_tokens, tau=req.tau, point_mapping=req.point_mapping,
                             multimask=req.multimask, segment=req.mask)
        return Job("ask", image=await decoded(req.image), question=req.question, options=options)

    async def outcome(job: Job, request: Request, deadline: float) -> Any:
        submit(job)
        try:
            return await race(asyncio.wrap_future(job.future), request, deadline)
        except (ApiError, _ClientGone):
            raise
        except Exception as exc:  # noqa: BLE001 - the item's own failure, mapped to its HTTP answer
            raise _api_error(exc) from exc
        finally:
            batcher.cancel(job)

    async def mask_url(answer: Any, wanted: bool) -> str | None:
        return await run_in_threadpool(schemas.mask_data_url, answer.mask) if wanted and answer.mask is not None else None

    def finish_reason(answer: Any) -> str:
        return "stop" if answer.token_ids and answer.token_ids[-1] in model.eos_ids else "length"

    async def answered(coro: Any) -> Any:
        try:
            return await coro
        except _ClientGone:
            return Response(status_code=499)

    # -------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def is_ready() -> JSONResponse:
        ok = ready["ok"] and batcher.alive
        body = {"status": "ready" if ok else "not ready", "model": settings.model_name, "device": model.device,
                "queue_depth": batcher.depth}
        if model.agreement_warning:
            body["warning"] = model.agreement_warning
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "octopus-rt"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        deadline = deadline_of()
        req = schemas.parse_chat(await json_body(request))
        job = await ask_job(req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await answered(stream(job, req, request, deadline, cid, created))

        async def run() -> JSONResponse:
            answer = await outcome(job, request, deadline)
            grounding = schemas.grounding_json(answer, await mask_url(answer, req.mask))
            return JSONResponse(schemas.completion_json(cid, created, settings.model_name, answer,
                                                        finish_reason(answer), grounding))

        return await answered(run())

    async def stream(job: Job, req: AskRequest, request: Request, deadline: float, cid: str, created: int) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_delta = lambda text: loop.call_soon_threadsafe(events.put_nowait, text)
        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, _END))
        submit(job)
        try:
            first = await race(events.get(), request, deadline)  # before any header: errors keep their status
            if first is _END and job.future.exception() is not None:
                raise _api_error(job.future.exception())
        except BaseException:
            batcher.cancel(job)
            raise
        chunk = lambda delta, finish=None, **extra: _sse(  # noqa: E731
            schemas.chunk_json(cid, created, settings.model_name, delta, finish, **extra))

        async def chunks():
            try:
                yield chunk({"role": "assistant", "content": ""})
                item = first
                while item is not _END:
                    yield chunk({"content": item})
                    try:
                        item = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        yield _sse(ApiError(504, f"no answer within the server's timeout of {settings.timeout:g} s",
                                            "timeout_error", "timeout").body())
                        yield "data: [DONE]\n\n"
                        return
                error = job.future.exception()
                if error is not None:
                    yield _sse(_api_error(error).body())
                else:
                    answer = job.future.result()
                    grounding = schemas.grounding_json(answer, await mask_url(answer, req.mask))
                    yield chunk({}, finish_reason(answer), grounding=grounding)
                    if req.include_usage:
                        yield chunk(None, usage=schemas.usage_json(answer))
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                setattr(request.state, CLIENT_GONE, True)
                raise
            finally:
                batcher.cancel(job)

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/ground")
    async def ground(request: Request) -> Response:
        deadline = deadline_of()
        data, values = await fields(request, {"question", "mask", "tau", "point_mapping", "multimask", "max_tokens"})
        req = AskRequest(image=data, **values)
        req.mask = bool(req.mask)
        job = await ask_job(req)

        async def run() -> JSONResponse:
            answer = await outcome(job, request, deadline)
            record = answer.to_json(await mask_url(answer, req.mask))
            record.update({"overlay": None, "device": model.device, "bundle": settings.model_name})
            return JSONResponse(record)

        return await answered(run())

    async def call(request: Request, allowed: set[str], fn: Any) -> Response:
        deadline = deadline_of()
        data, values = await fields(request, allowed)
        rgb = await decoded(data)
        return await answered(outcome(Job("call", fn=lambda m: fn(m, rgb, values)), request, deadline))

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        def run(m: Any, rgb: np.ndarray, _values: dict[str, Any]) -> JSONResponse:
            result = m.score(rgb)
            metrics.answer(result)
            return JSONResponse(result.to_json())

        return await call(request, set(), run)

    @app.post("/v1/choose")
    async def choose(request: Request) -> Response:
        def run(m: Any, rgb: np.ndarray, values: dict[str, Any]) -> JSONResponse:
            if "options" not in values:
                raise InputError("options are missing (a list of 1 to 4 strings)")
            result = m.choose(rgb, values["question"], values["options"])
            metrics.answer(result)
            return JSONResponse(result.to_json())

        return await call(request, {"question", "options"}, run)

    return app

"""Requests and responses of `octopus-rt serve`: parsing with OpenAI-style errors (no FastAPI types).

Everything a request carries is checked here, before it can take a queue slot; each refusal is an
`ApiError` (HTTP status + the OpenAI error body {"error": {"message", "type", "param", "code"}}).
Images arrive only as base64 `data:` URLs (JSON) or as an uploaded file (multipart): the server never
fetches a URL and never opens a path named by a request.

Chat requests follow OpenAI's `/v1/chat/completions`: one user message whose content holds the
question (text parts, joined by newlines) and exactly one `image_url` part. The model answers
greedily, so sampling parameters are refused unless they hold their no-op value; parameters
outside the OpenAI request format are refused too (a typo must not be ignored silently). The
extra `grounding` object (the OpenAI client sends it with `extra_body`) asks for the mask and may
override the bundle's closed-set options: {"mask": bool, "tau": float, "point_mapping": str,
"multimask": bool}.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ApiError", "AskRequest", "parse_chat", "parse_fields", "decode_data_url", "mask_data_url",
    "grounding_json", "completion_json", "chunk_json", "MAX_QUESTION_CHARS",
]

MAX_QUESTION_CHARS = 4000

# OpenAI chat parameters the server accepts only at their no-op value (the model answers greedily
# with one choice and no tools); absent or None is always fine.
_NO_OP: dict[str, tuple[Any, ...]] = {
    "temperature": (0, 0.0),
    "top_p": (1, 1.0),
    "n": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "stop": ([],),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
}
# OpenAI parameters with no effect on a greedy answer, accepted and ignored.
_IGNORED = {"model", "user", "seed", "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort"}
_GROUNDING_KEYS = {"mask": bool, "tau": float, "point_mapping": str, "multimask": bool}
# Fields of /v1/ground, /v1/score and /v1/choose (JSON, or multipart form fields as strings).
_FIELD_TYPES = {
    "question": str, "mask": bool, "tau": float, "point_mapping": str, "multimask": bool,
    "max_tokens": int, "options": list,
}


class ApiError(Exception):
    """A refused request: HTTP `status`, OpenAI error `type` and `code`, optional response headers."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, code: str = "invalid_request", param: str | None = None) -> ApiError:
    return ApiError(400, message, code=code, param=param)


@dataclass
class AskRequest:
    """A parsed question: image bytes (not decoded yet), question and the per-request options."""

    image: bytes
    question: str
    max_tokens: int | None = None
    mask: bool = False
    tau: float | None = None
    point_mapping: str | None = None
    multimask: bool | None = None
    stream: bool = False
    include_usage: bool = False


def decode_data_url(url: Any, param: str = "image_url") -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL; ApiError 400 for anything else."""
    if not isinstance(url, str) or not url:
        raise _bad("the image must be a base64 data: URL string", "invalid_image", param)
    if not url[:5].lower() == "data:":
        raise _bad("only base64 data: URLs are accepted (data:image/png;base64,...); the server fetches no URL "
                   "and reads no file path", "unsupported_image_url", param)
    header, sep, payload = url[5:].partition(",")
    media, *flags = [part.strip().lower() for part in header.split(";")]
    if not sep or "base64" not in flags:
        raise _bad("the data: URL must be base64-encoded (data:image/png;base64,...)", "invalid_image", param)
    if media and not media.startswith("image/"):
        raise _bad(f"the data: URL holds {media!r}, not an image", "invalid_image", param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"the image is not valid base64 ({exc})", "invalid_image", param) from exc
    if not data:
        raise _bad("the image is empty", "invalid_image", param)
    return data


def _question(text: Any, param: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise _bad("the question is empty", "invalid_question", param)
    if len(text) > MAX_QUESTION_CHARS:
        raise _bad(f"the question has {len(text)} characters, above the limit of {MAX_QUESTION_CHARS}",
                   "question_too_long", param)
    return text


def _typed(name: str, value: Any, kind: type, param: str) -> Any:
    """JSON value -> int / float / bool / str / list of str, or ApiError; None passes through."""
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is list:
        ok = ok and all(isinstance(item, str) for item in value)
    if not ok:
        raise _bad(f"{name} must be {'a list of strings' if kind is list else f'a {kind.__name__}'}",
                   "invalid_type", param)
    if kind is float and not (math.isfinite(value) and value > 0):
        raise _bad(f"{name} must be a finite number > 0", "invalid_value", param)
    if kind is int and value < 1:
        raise _bad(f"{name} must be >= 1", "invalid_value", param)
    return value


def _content(message: dict[str, Any]) -> tuple[str, bytes]:
    content = message.get("content")
    if isinstance(content, str):
        raise _bad("the user message has no image: send content parts with one image_url (a data: URL)",
                   "missing_image", "messages")
    if not isinstance(content, list) or not content:
        raise _bad("the user message content must be a list of parts (text and one image_url)", "invalid_content",
                   "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text"))
        elif kind == "image_url":
            image_url = part.get("image_url")
            images.append(image_url.get("url") if isinstance(image_url, dict) else image_url)
        else:
            raise _bad(f"content part type {kind!r} is not supported (text, image_url)", "invalid_content", "messages")
    if not images:
        raise _bad("the user message has no image_url part", "missing_image", "messages")
    if len(images) > 1:
        raise _bad(f"the model takes one image per question, got {len(images)}", "too_many_images", "messages")
    if not all(isinstance(text, str) for text in texts):
        raise _bad("a text part has no text string", "invalid_content", "messages")
    return _question("\n".join(texts), "messages"), decode_data_url(images[0], "messages")


def parse_chat(body: Any) -> AskRequest:
    """An OpenAI chat-completions request body (already JSON-decoded) -> AskRequest, or ApiError."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", "invalid_json")
    for key, value in body.items():
        if key in _NO_OP and value is not None and value not in _NO_OP[key]:
            raise _bad(f"{key}={value!r} is not supported: the model answers greedily (one choice, no tools); "
                       f"leave it out or use {_NO_OP[key][0]!r}", "unsupported_parameter", key)
        if key not in _NO_OP and key not in _IGNORED and key not in (
                "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "grounding"):
            raise _bad(f"unknown parameter {key!r}", "unknown_parameter", key)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "invalid_messages", "messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise _bad("the model answers one question about one image: send exactly one user message "
                   "(system prompts and earlier turns are not supported)", "invalid_messages", "messages")
    question, image = _content(messages[0])
    tokens = [_typed(key, body.get(key), int, key) for key in ("max_tokens", "max_completion_tokens")]
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "invalid_type", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage", "include_obfuscation"}:
        raise _bad("stream_options takes only include_usage", "invalid_value", "stream_options")
    request = AskRequest(image=image, question=question, max_tokens=tokens[1] or tokens[0], stream=stream,
                         include_usage=bool(stream_options.get("include_usage")))
    grounding = body.get("grounding")
    if grounding is not None:
        if not isinstance(grounding, dict):
            raise _bad("grounding must be an object like {\"mask\": true}", "invalid_type", "grounding")
        for key, value in grounding.items():
            if key not in _GROUNDING_KEYS:
                raise _bad(f"unknown grounding option {key!r} ({', '.join(_GROUNDING_KEYS)})", "unknown_parameter",
                           "grounding")
            setattr(request, key, _typed(f"grounding.{key}", value, _GROUNDING_KEYS[key], "grounding"))
        request.mask = bool(request.mask)
    return request


def _from_form(name: str, value: str, kind: type) -> Any:
    """A multipart form value (a string) -> the field's type."""
    if kind is bool:
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise _bad(f"{name} must be true or false", "invalid_value", name)
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError as exc:
            raise _bad(f"{name} must be a number", "invalid_type", name) from exc
    return value


def parse_fields(fields: dict[str, Any], allowed: set[str], *, form: bool = False) -> dict[str, Any]:
    """The fields of /v1/ground, /v1/score, /v1/choose (`image` handled by the caller): unknown keys
    refused, types checked; multipart strings converted (`options` repeats, or one JSON list)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "image":
            continue
        if key not in allowed:
            raise _bad(f"unknown field {key!r} ({', '.join(sorted(allowed | {'image'}))})", "unknown_parameter", key)
        kind = _FIELD_TYPES[key]
        if form and kind is not list:
            value = _from_form(key, value, kind)
        out[key] = _typed(key, value, kind, key) if key != "question" else _question(value, key)
    if "question" in allowed and "question" not in out:
        raise _bad("question is missing", "invalid_question", "question")
    return out


def mask_data_url(mask: np.ndarray) -> str:
    """H x W bool mask -> data:image/png;base64 of the same 8-bit PNG `octopus-rt infer --mask` writes."""
    from octopus_rt.runtime.overlay import mask_to_png

    buffer = io.BytesIO()
    mask_to_png(mask).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def grounding_json(answer: Any, mask_url: str | None) -> dict[str, Any]:
    """The `grounding` object of a chat completion: point [x, y] px or null, probs, whole_image,
    mask_iou, mask (PNG data URL when asked for), mask_area, image_size [W, H]."""
    record = answer.to_json(mask_url)
    return {key: record[key] for key in ("point", "probs", "whole_image", "mask", "mask_iou", "mask_area", "image_size")}


def completion_json(cid: str, created: int, model: str, answer: Any, finish: str, grounding: dict[str, Any]) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": usage_json(answer),
        "grounding": grounding,
    }


def usage_json(answer: Any) -> dict[str, int]:
    prompt, completion = int(answer.prompt_tokens), len(answer.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk_json(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """One `chat.completion.chunk`; `extra` adds top-level keys (grounding, usage)."""
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None else []
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **extra}

"""The requests of trimformer's OpenAI-compatible servers (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``): a request validated into a `Job` or a GET route's answer, or a `RequestError`
in OpenAI's error shape; the token choice (greedy at temperature 0, else top-p sampling) and what of a
streamed text to hold back. Both the standard-library server and the Ray Serve application use them."""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

COMPLETION_DEFAULT_TOKENS = 16     # OpenAI's default max_tokens for /v1/completions
MAX_BODY_BYTES = 16 << 20
POST_ROUTES = ("/v1/completions", "/v1/chat/completions")
ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def __reduce__(self):          # pickled whole (between Ray processes), not as Exception(message)
        return type(self), (self.status, self.message, self.param, self.code, self.kind)


# ---- requests ---------------------------------------------------------------------------------
@dataclass
class Job:
    """One request, validated, waiting for (or in) the worker; `events` carries its answer back."""

    chat: bool
    prompt: str | list[int] | list[dict[str, str]]   # text, token ids, or chat messages
    max_tokens: int | None                            # None: the server's default for the prompt
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    events: queue.Queue = field(default_factory=queue.Queue)   # ("text", str) ... ("done", reason, usage)
    cancelled: threading.Event = field(default_factory=threading.Event)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(400, f"'{name}' must be a number in {bound}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(400, f"'{name}' must be an integer >= {low}, got {value!r}", name)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, f"'stop' must be a non-empty string or a list of at most 4, got {value!r}", "stop")
    return stops


def _content(message: Any, index: int) -> dict[str, str]:
    """A chat message as {"role", "content"} with text content (a list of text parts is joined)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(400, f"{where} must be an object with a 'role' in {list(ROLES)}", "messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(400, f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                    "supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"{where}.content must be a string or a list of text parts", "messages")
    return {"role": message["role"], "content": content}


def parse_request(body: Any, chat: bool) -> Job:
    """The JSON body of a (chat) completion request -> a Job, or a RequestError saying what is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' is required: a non-empty list of {'role', 'content'}", "messages")
        prompt: Any = [_content(m, i) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        ids = isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)   # bools are not ids
        if not (isinstance(prompt, str) and prompt) and not ids:
            raise RequestError(400, "'prompt' is required: a non-empty string or a list of token ids "
                                    "(one prompt per request)", "prompt")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    for name in ("logprobs", "echo", "top_logprobs"):
        if body.get(name) not in (None, False, 0):
            raise RequestError(400, f"'{name}' is not supported by trimformer serve", name)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    limit_field = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, limit_field, 1)
    if max_tokens is None and not chat:
        max_tokens = COMPLETION_DEFAULT_TOKENS
    return Job(chat=chat, prompt=prompt, max_tokens=max_tokens,
               temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
               top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), stop=_stop(body),
               seed=_integer(body, "seed", 0), stream=stream, include_usage=bool(options.get("include_usage")))


def get_route(path: str, name: str, created: int) -> dict[str, Any]:
    """The JSON answer of a GET `path` (``/health``, ``/v1/models``), or a RequestError (405, 404)."""
    if path == "/health":
        return {"status": "ok"}
    if path == "/v1/models":
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": created, "owned_by": "trimformer"}]}
    if path in POST_ROUTES:
        raise RequestError(405, f"{path} takes POST", code="method_not_allowed")
    raise RequestError(404, f"no route {path}; routes: /v1/completions, /v1/chat/completions, /v1/models, /health",
                       code="not_found")


def body_length(headers: Mapping[str, str]) -> int:
    """The Content-Length a POST must carry, within MAX_BODY_BYTES; a RequestError (411, 413) otherwise."""
    if "chunked" in headers.get("Transfer-Encoding", ""):
        raise RequestError(411, "send the body with a Content-Length (chunked request bodies are not supported)")
    length = headers.get("Content-Length")
    if length is None or not length.isdigit():
        raise RequestError(411, "a Content-Length header is required")
    if int(length) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    return int(length)


def post_request(path: str, body: bytes, name: str) -> tuple[dict[str, Any], Job]:
    """A POST to `path` with `body`, for the server of model `name` -> (the JSON payload, its Job), or a
    RequestError: an unknown route (404), a body that is not JSON or not a valid request (400), another
    model's name (404)."""
    if path not in POST_ROUTES:
        raise RequestError(404, f"no route POST {path}; POST routes: {', '.join(POST_ROUTES)}", code="not_found")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc
    job = parse_request(payload, chat=path == "/v1/chat/completions")
    model = payload.get("model")
    if model is not None and model != name:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")
    return payload, job


# ---- generation -------------------------------------------------------------------------------
def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits (V,) -> a token: argmax at temperature 0, else a sample from the top-p nucleus."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p       # the nucleus: mass before < top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` not to send yet: the start of a stop string, or an unfinished
    multi-byte character."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

"""The answers of trimformer's OpenAI-compatible servers, built from the engine's events for one `Job`:
``("text", str)`` pieces, then ``("done", finish_reason, usage)`` or ``("error", RequestError)``. A whole
answer is one JSON body; a streamed one is server-sent events (``data: {...}`` chunks, then
``data: [DONE]``). Both the standard-library server and the Ray Serve application use them."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .serve_api import Job, RequestError

Event = tuple                      # ("text", str) | ("done", str, dict) | ("error", RequestError)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


def ident(job: Job) -> str:
    return f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"


def whole_answer(job: Job, name: str, events: list[Event]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of a request answered whole, from all its events."""
    end = events[-1]
    if end[0] == "error":
        return end[1].status, end[1].body()
    _, finish, usage = end
    text = "".join(e[1] for e in events if e[0] == "text")
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return 200, {"id": ident(job), "object": "chat.completion" if job.chat else "text_completion",
                 "created": int(time.time()), "model": name, "choices": [choice], "usage": usage}


class StreamAnswer:
    """The server-sent events of a streamed request, event by event (`data(event)`); begun once its first
    event is known not to be an error (that one is a plain error response instead)."""

    def __init__(self, job: Job, name: str):
        self.job, self.name = job, name
        self.ident, self.created = ident(job), int(time.time())
        self.kind = "chat.completion.chunk" if job.chat else "text_completion"
        self.first = True

    def data(self, event: Event) -> bytes:
        """The bytes to send for `event`; the last event's end with ``data: [DONE]``."""
        if event[0] == "text":
            out = self._chunk([self._choice(event[1], None, role=self.first)])
            self.first = False
            return out
        if event[0] == "error":
            return self._sse(event[1].body()) + DONE
        _, finish, usage = event
        out = self._chunk([self._choice("", None, role=True)]) if self.first and self.job.chat else b""
        out += self._chunk([self._choice(None, finish)])
        if self.job.include_usage:
            out += self._chunk([], usage=usage)
        return out + DONE

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not self.job.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _chunk(self, choices: list[dict], **extra: Any) -> bytes:
        return self._sse({"id": self.ident, "object": self.kind, "created": self.created, "model": self.name,
                          "choices": choices, **extra})

    @staticmethod
    def _sse(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"


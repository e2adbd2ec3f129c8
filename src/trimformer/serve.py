"""`trimformer serve`: an OpenAI-compatible HTTP server (``/v1/completions``, ``/v1/chat/completions``,
streaming as server-sent events included) on a trimmed model, from the standard library alone.

Requests are answered one at a time, in arrival order, by a single worker thread that owns the
model; the HTTP threads only parse, queue and write. A bad request gets a 4xx JSON error in OpenAI's
shape (``{"error": {"message", "type", "param", "code"}}``); a failure while generating gets a 500
(or, once a stream has started, an error event), and the server carries on with the next request.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import torch

from .api import stats, trim, untrim
from .config import TrimConfig
from .registry import get_method
from .patch.cache_names import cache_kwargs, output_cache

MAX_BODY_BYTES = 16 << 20
COMPLETION_DEFAULT_TOKENS = 16     # OpenAI's default max_tokens for /v1/completions
ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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


class Engine:
    """The model behind the server: one worker thread takes the queued jobs in order."""

    def __init__(self, model, tokenizer, config: TrimConfig | None, default_max_tokens: int = 512,
                 log: Callable[[str], None] | None = None):
        """Trims `model` with `config` (None: serve the full model). `default_max_tokens`: the limit of a
        chat request that names none (a completion request's default is OpenAI's, 16)."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.default_max_tokens = default_max_tokens
        self.log = log
        self.context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        protected = config.sinks + config.protect_last if config and get_method(config.method).prunes_prefill else 0
        self.shortest_trimmed = protected + 1      # shorter prompts have nothing to prune: full model
        embed = model.get_input_embeddings().weight.device     # offloaded: meta; accelerate moves inputs
        self.device = embed if embed.type != "meta" else torch.device("cpu")
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="trimformer-serve-worker", daemon=True)
        if config is not None:
            trim(model, config)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.worker.join()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except RequestError as exc:
                job.events.put(("error", exc))
            except Exception as exc:  # noqa: BLE001 - the server stays up; the client hears what failed
                traceback.print_exc(file=sys.stderr)
                job.events.put(("error", RequestError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                                      kind="server_error")))

    def encode(self, job: Job) -> list[int]:
        if isinstance(job.prompt, str):
            return self.tokenizer(job.prompt)["input_ids"]
        if not job.chat:
            vocab = self.model.config.vocab_size
            if not all(0 <= t < vocab for t in job.prompt):
                raise RequestError(400, f"token ids must be in [0, {vocab})", "prompt")
            return list(job.prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            out = self.tokenizer.apply_chat_template(job.prompt, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        except Exception as exc:  # noqa: BLE001 - the template refused these messages (e.g. role order)
            raise RequestError(400, f"the chat template refused these messages: {exc}", "messages") from exc
        return list(out["input_ids"])

    @contextmanager
    def _full_model_if_short(self, length: int) -> Iterator[None]:
        """Prompts no longer than the protected tokens (sinks + protect_last) run on the full model."""
        if self.config is None or length >= self.shortest_trimmed:
            yield
            return
        untrim(self.model)
        try:
            yield
        finally:
            trim(self.model, self.config)

    @torch.inference_mode()
    def _run(self, job: Job) -> None:
        ids = self.encode(job)
        room = self.context - len(ids)
        wanted = job.max_tokens if job.max_tokens is not None else min(self.default_max_tokens, room)
        if not 1 <= wanted <= room:
            raise RequestError(400, f"this model's maximum context length is {self.context} tokens; the prompt "
                                    f"has {len(ids)} and max_tokens asks for {wanted} more", "max_tokens")
        generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        start = time.perf_counter()
        tokens: list[int] = []
        text, sent, finish, ttft = "", 0, "length", None
        with self._full_model_if_short(len(ids)):
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
            kept = stats(self.model)["kept_fraction"] if self.config and len(ids) >= self.shortest_trimmed else 1.0
            cache = output_cache(out)
            while len(tokens) < wanted:
                token = pick(out.logits[0, -1], job.temperature, job.top_p, generator)
                ttft = ttft if ttft is not None else time.perf_counter() - start
                if token in self.eos:
                    finish = "stop"
                    break
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                ready = len(text) - held_back(text, job.stop)
                if ready > sent:
                    job.events.put(("text", text[sent:ready]))
                    sent = ready
                if job.cancelled.is_set() or len(tokens) == wanted:
                    break
                out = self.model(input_ids=torch.tensor([[token]], device=self.device), **cache_kwargs(cache),
                                 use_cache=True)
                cache = output_cache(out)
        if len(text) > sent:
            job.events.put(("text", text[sent:]))
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}
        job.events.put(("done", finish, usage))
        if self.log:
            self.log(f"[trimformer serve] prompt {len(ids)} tokens, {len(tokens)} generated, TTFT {ttft:.3f} s, "
                     f"kept {kept:.1%} of the prefill work, finish {finish}")


# ---- HTTP -------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    """OpenAI's routes over the engine (`self.server.engine`)."""

    protocol_version = "HTTP/1.1"
    server: "Server"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log:
            self.server.log(f"[trimformer serve] {self.address_string()} {format % args}")

    # -- routes --
    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.name, "object": "model",
                                                         "created": self.server.created, "owned_by": "trimformer"}]})
        elif self.path in ("/v1/completions", "/v1/chat/completions"):
            self._error(RequestError(405, f"{self.path} takes POST", code="method_not_allowed"))
        else:
            self._error(RequestError(404, f"no route {self.path}; routes: /v1/completions, /v1/chat/completions, "
                                          "/v1/models, /health", code="not_found"))

    def do_POST(self) -> None:
        try:
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self._read_body()
                raise RequestError(404, f"no route POST {self.path}; POST routes: /v1/completions, "
                                        "/v1/chat/completions", code="not_found")
            body = self._read_body()
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc
            job = parse_request(payload, chat=self.path == "/v1/chat/completions")
            model = payload.get("model")
            if model is not None and model != self.server.name:
                raise RequestError(404, f"the model {model!r} does not exist; this server serves {self.server.name!r}",
                                   "model", "model_not_found")
        except RequestError as exc:
            self._error(exc)
            return
        self.server.engine.submit(job)
        try:
            self._stream(job) if job.stream else self._whole(job)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()       # the client left: stop generating for it

    # -- answers --
    def _whole(self, job: Job) -> None:
        parts: list[str] = []
        while (event := job.events.get())[0] == "text":
            parts.append(event[1])
        if event[0] == "error":
            self._error(event[1])
            return
        _, finish, usage = event
        ident, created, text = self._ident(job), int(time.time()), "".join(parts)
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        self._json(200, {"id": ident, "object": "chat.completion" if job.chat else "text_completion",
                         "created": created, "model": self.server.name, "choices": [choice], "usage": usage})

    def _stream(self, job: Job) -> None:
        event = job.events.get()
        if event[0] == "error":             # nothing sent yet: a plain error response
            self._error(event[1])
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        ident, created = self._ident(job), int(time.time())
        kind = "chat.completion.chunk" if job.chat else "text_completion"

        def chunk(choices: list[dict], **extra: Any) -> None:
            self._event({"id": ident, "object": kind, "created": created, "model": self.server.name,
                         "choices": choices, **extra})

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if not job.chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        first = True
        while event[0] == "text":
            chunk([choice(event[1], None, role=first)])
            first = False
            event = job.events.get()
        if event[0] == "error":
            self._event(event[1].body())
        else:
            _, finish, usage = event
            if first and job.chat:
                chunk([choice("", None, role=True)])
            chunk([choice(None, finish)])
            if job.include_usage:
                chunk([], usage=usage)
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _ident(self, job: Job) -> str:
        return f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"

    # -- wire --
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length (chunked request bodies are not supported)")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        return self.rfile.read(int(length))

    def _event(self, payload: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: RequestError) -> None:
        self._json(exc.status, exc.body())


class Server(ThreadingHTTPServer):
    """``Server(engine, "name", ("127.0.0.1", 0))``: `start()` serves in the background, `close()` stops."""

    daemon_threads = True

    def __init__(self, engine: Engine, name: str, address: tuple[str, int] = ("127.0.0.1", 8000),
                 log: Callable[[str], None] | None = None):
        super().__init__(address, Handler)
        self.engine, self.name, self.log = engine, name, log
        self.created = int(time.time())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Server":
        self.engine.start()
        self._thread = threading.Thread(target=self.serve_forever, name="trimformer-serve-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.engine.stop()

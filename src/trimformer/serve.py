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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import torch

from .api import stats, trim, untrim
from .config import TrimConfig
from .generation import GreedyStream
from .registry import resolve
from .serve_api import Job, RequestError, held_back, parse_request, pick

MAX_BODY_BYTES = 16 << 20


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
        protected = config.sinks + config.protect_last if config and resolve(config).prunes_prefill else 0
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
        trimmed = self.config is not None and len(ids) >= self.shortest_trimmed
        kept = [1.0]

        def choose(logits: torch.Tensor) -> torch.Tensor:
            return torch.tensor([pick(logits[0], job.temperature, job.top_p, generator)], device=self.device)

        def after_prefill(cache) -> None:
            if trimmed:
                kept[0] = stats(self.model)["kept_fraction"]

        tokens: list[int] = []
        text, sent, finish = "", 0, None
        with self._full_model_if_short(len(ids)):
            stream = GreedyStream(self.model, torch.tensor([ids], device=self.device), wanted, list(self.eos),
                                  choose=choose, on_prefill=after_prefill)
            for token in stream:
                tokens.append(int(token[0]))
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                ready = len(text) - held_back(text, job.stop)
                if ready > sent:
                    job.events.put(("text", text[sent:ready]))
                    sent = ready
                if job.cancelled.is_set():
                    break
        finish = finish or stream.finish_reason or "length"
        if len(text) > sent:
            job.events.put(("text", text[sent:]))
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}
        job.events.put(("done", finish, usage))
        if self.log:
            self.log(f"[trimformer serve] prompt {len(ids)} tokens, {len(tokens)} generated, TTFT {stream.ttft_s:.3f} s, "
                     f"kept {kept[0]:.1%} of the prefill work, finish {finish}")


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

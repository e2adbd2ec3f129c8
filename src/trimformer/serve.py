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
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import torch

from .api import stats, trim, untrim
from .config import TrimConfig
from .generation import GreedyStream
from .registry import resolve
from .serve_answers import SSE_HEADERS, StreamAnswer, whole_answer
from .serve_api import Job, RequestError, body_length, get_route, held_back, pick, post_request


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
            self.answer(job)

    def answer(self, job: Job) -> None:
        """Generates `job`'s answer into `job.events` (skipped if cancelled); a failure ends them with an
        error event: the request's RequestError, or a 500."""
        if job.cancelled.is_set():
            return
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

    def do_GET(self) -> None:
        try:
            self._json(200, get_route(self.path, self.server.name, self.server.created))
        except RequestError as exc:
            self._error(exc)

    def do_POST(self) -> None:
        try:
            try:
                body = self.rfile.read(body_length(self.headers))
            except RequestError:
                self.close_connection = True
                raise
            _, job = post_request(self.path, body, self.server.name)
        except RequestError as exc:
            self._error(exc)
            return
        self.server.engine.submit(job)
        try:
            self._stream(job) if job.stream else self._whole(job)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()       # the client left: stop generating for it

    def _whole(self, job: Job) -> None:
        events = [job.events.get()]
        while events[-1][0] == "text":
            events.append(job.events.get())
        self._json(*whole_answer(job, self.server.name, events))

    def _stream(self, job: Job) -> None:
        event = job.events.get()
        if event[0] == "error":             # nothing sent yet: a plain error response
            self._error(event[1])
            return
        self.send_response(200)
        for key, value in SSE_HEADERS.items():
            self.send_header(key, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        answer = StreamAnswer(job, self.server.name)
        self._write_chunk(answer.data(event))
        while event[0] == "text":
            event = job.events.get()
            self._write_chunk(answer.data(event))
        self._write_chunk(b"")

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

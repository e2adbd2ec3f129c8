"""`trimformer serve --ray`: the OpenAI-compatible server of `trimformer.serve` as a Ray Serve application,
with the trimmed model replicated.

Two deployments: `OpenAIRoutes`, the HTTP ingress (one replica: routes, request validation, whole JSON or
server-sent events, with the request and answer code of the standard-library server), and `TrimmedModel`,
the model replicas (each loads and trims the model once, sets its torch threads, and gathers requests into
batches with ``serve.batch``; a batch's rows are generated one after another on the replica's worker
thread). A request whose replica dies before any of its answer reached the client is sent again (to a live
replica); once a stream has begun it ends with an error event, and a request that cannot be placed gets a
503, both in OpenAI's error shape. Serve starts a new replica in place of the dead one.

Ray is imported only when the application is built or run: ``pip install -e ".[ray]"``.

    trimformer serve --ray --replicas 2 --threads-per-replica 1 --model smollm2-135m --method lazy
    serve run trimformer.serve_ray:app_builder model=smollm2-135m method=lazy replicas=2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import torch

from .cli_options import add_model_options, add_server_options, add_trim_options, trim_config_from_args
from .config import TrimConfig
from .errors import TrimformerError
from .loading import load_model
from .serve import Engine
from .serve_answers import SSE_HEADERS, Event, StreamAnswer, whole_answer
from .serve_api import Job, RequestError, body_length, get_route, parse_request, post_request

APP_NAME = "trimformer"
RETRIES = 2                # more tries of a request whose replica died before the client saw any of it


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """The options of `trimformer serve --ray` (added to the serve command's parser)."""
    g = parser.add_argument_group("replicas on Ray Serve (--ray)")
    g.add_argument("--ray", action="store_true", help="serve through Ray Serve, the model replicated")
    g.add_argument("--ray-address", default=None,
                   help="a running Ray cluster to join (auto: the local one; default: start a new one)")
    g.add_argument("--replicas", type=int, default=1, help="model replicas (default: %(default)s)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas ...")
    g.add_argument("--max-replicas", type=int, default=None, help="... to this many (both set: autoscaling)")
    g.add_argument("--max-batch-size", type=int, default=8, help="requests a replica gathers into one batch "
                                                                 "(default: %(default)s)")
    g.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a replica waits for a batch to fill (default: %(default)s)")
    g.add_argument("--threads-per-replica", type=int, default=1, help="torch threads of each replica "
                                                                      "(default: %(default)s)")
    g.add_argument("--cpus-per-replica", type=float, default=None,
                   help="CPUs Ray reserves for each replica (default: --threads-per-replica)")


# ---- the deployments ---------------------------------------------------------------------------
class LoopEvents:
    """A job's event queue on a replica: put from the engine's thread, awaited on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self) -> Event:
        return await self.queue.get()


class TrimmedModel:
    """A model replica: the trimmed model's `Engine`; `generate` streams one request's events."""

    def __init__(self, model: str, config: TrimConfig | None, threads: int | None, default_max_tokens: int,
                 max_batch_size: int, batch_wait_s: float, log: bool):
        from ray import serve

        if threads:
            torch.set_num_threads(threads)
        loaded, tokenizer = load_model(model)
        printer = (lambda m: print(m, file=sys.stderr, flush=True)) if log else None
        self.engine = Engine(loaded, tokenizer, config, default_max_tokens=default_max_tokens, log=printer)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="trimformer-replica")
        self.batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)(self._rows)

    async def generate(self, payload: dict[str, Any], chat: bool) -> AsyncIterator[Event]:
        """The events of one request (validated again here: the same `parse_request` as the ingress)."""
        try:
            job = parse_request(payload, chat)
        except RequestError as exc:
            yield ("error", exc)
            return
        job.events = LoopEvents(asyncio.get_running_loop())
        asyncio.ensure_future(self.batched(job))
        try:
            while (event := await job.events.get())[0] == "text":
                yield event
            yield event
        finally:
            job.cancelled.set()          # the caller left (or the answer is done): stop generating for it

    async def _rows(self, jobs: list[Job]) -> list[None]:
        """One batch: its rows one after another on the worker thread."""
        def run() -> None:
            for job in jobs:
                self.engine.answer(job)

        await asyncio.get_running_loop().run_in_executor(self.worker, run)
        return [None] * len(jobs)


class OpenAIRoutes:
    """The HTTP ingress: OpenAI's routes, answered by the `TrimmedModel` replicas behind `model`."""

    def __init__(self, model, name: str):
        self.model, self.name, self.created = model, name, int(time.time())

    async def __call__(self, request) -> Any:
        from starlette.responses import Response, StreamingResponse

        def json_response(status: int, payload: dict[str, Any]) -> Response:
            return Response(json.dumps(payload), status_code=status, media_type="application/json")

        path = request.url.path
        try:
            if request.method == "GET":
                return json_response(200, get_route(path, self.name, self.created))
            if request.method != "POST":
                raise RequestError(405, f"{path} takes GET or POST, not {request.method}", code="method_not_allowed")
            body_length(request.headers)
            payload, job = post_request(path, await request.body(), self.name)
        except RequestError as exc:
            return json_response(exc.status, exc.body())
        events = self._events(payload, job.stream, job.chat)
        if not job.stream:
            return json_response(*whole_answer(job, self.name, [e async for e in events]))
        first = await events.__anext__()
        if first[0] == "error":                  # nothing sent yet: a plain error response
            return json_response(first[1].status, first[1].body())
        answer = StreamAnswer(job, self.name)

        async def chunks() -> AsyncIterator[bytes]:
            yield answer.data(first)
            async for event in events:
                yield answer.data(event)

        return StreamingResponse(chunks(), headers=SSE_HEADERS)

    async def _events(self, payload: dict[str, Any], stream: bool, chat: bool) -> AsyncIterator[Event]:
        """The events of one request from a replica. A try whose replica dies is repeated while nothing of it
        has reached the client (a whole answer is held back until its end), up to RETRIES times; then a 503
        error event. Any other failure: a 500 error event."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import ReplicaUnavailableError

        for attempt in range(RETRIES + 1):
            held: list[Event] = []
            sent = finished = False
            response = self.model.options(stream=True).generate.remote(payload, chat)
            try:
                async for event in response:
                    if stream:
                        sent = True
                        yield event
                    else:
                        held.append(event)
                finished = True
            except (RayActorError, ReplicaUnavailableError) as exc:
                if sent or attempt == RETRIES:
                    yield ("error", RequestError(503, f"the model replica answering this request was lost "
                                                      f"({type(exc).__name__}); send it again",
                                                 code="replica_lost", kind="server_error"))
                    return
                continue
            except Exception as exc:  # noqa: BLE001 - any other failure reaches the client in OpenAI's shape
                yield ("error", RequestError(500, f"the model replica failed: {type(exc).__name__}: {exc}",
                                             kind="server_error"))
                return
            finally:
                if not finished:
                    response.cancel()
            for event in held:
                yield event
            return


# ---- building and running ----------------------------------------------------------------------
def build_app(args: argparse.Namespace):
    """The Ray Serve application of `trimformer serve` arguments (its --ray options included)."""
    from ray import serve

    if args.max_tokens < 1 or args.max_batch_size < 1 or args.batch_wait_ms < 0 or args.threads_per_replica < 1:
        raise TrimformerError("--max-tokens, --max-batch-size and --threads-per-replica must be >= 1, "
                              "--batch-wait-ms >= 0")
    config = None if args.method == "none" else trim_config_from_args(args)
    scaling: dict[str, Any] = {"num_replicas": args.replicas}
    if args.min_replicas is not None or args.max_replicas is not None:
        if args.min_replicas is None or args.max_replicas is None or not 0 <= args.min_replicas <= args.max_replicas:
            raise TrimformerError("autoscaling takes both --min-replicas and --max-replicas, min <= max")
        scaling = {"autoscaling_config": {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                          "target_ongoing_requests": args.max_batch_size}}
    elif args.replicas < 1:
        raise TrimformerError(f"--replicas must be >= 1, got {args.replicas}")
    cpus = args.cpus_per_replica if args.cpus_per_replica is not None else float(args.threads_per_replica)
    model = serve.deployment(TrimmedModel).options(
        **scaling, max_ongoing_requests=2 * args.max_batch_size, ray_actor_options={"num_cpus": cpus},
    ).bind(args.model, config, args.threads_per_replica, args.max_tokens, args.max_batch_size,
           args.batch_wait_ms / 1000, not args.quiet)
    routes = serve.deployment(OpenAIRoutes).options(num_replicas=1, max_ongoing_requests=4096,
                                                    ray_actor_options={"num_cpus": 0})
    return routes.bind(model, args.served_model_name or args.model)


def serve_args(options: dict[str, Any]) -> argparse.Namespace:
    """`trimformer serve` arguments from a dict of option names (``served_model_name`` or
    ``served-model-name``) to values; True sets a flag."""
    parser = argparse.ArgumentParser(prog="trimformer.serve_ray:app_builder")
    add_model_options(parser)
    add_trim_options(parser, allow_none=True)
    add_server_options(parser)
    add_ray_options(parser)
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True or str(value).lower() == "true":
            argv.append(flag)
        elif value is not False and str(value).lower() != "false":
            argv += [flag, str(value)]
    return parser.parse_args(argv)


def app_builder(args: dict[str, Any]):
    """Ray Serve's application builder: ``serve run trimformer.serve_ray:app_builder model=... method=lazy
    replicas=2`` (any option of `trimformer serve`, without the dashes)."""
    return build_app(serve_args(args))


def run(args: argparse.Namespace) -> int:
    """`trimformer serve --ray`: start Ray (or join --ray-address) and the application; block until Ctrl-C."""
    import ray
    from ray import serve

    if args.port == 0:
        raise TrimformerError("--ray serves on a fixed --port (0 is not supported)")
    app = build_app(args)
    ray.init(address=args.ray_address or "local", include_dashboard=False, log_to_driver=not args.quiet)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        name = args.served_model_name or args.model
        print(f"trimformer serve: http://{args.host}:{args.port}/v1 serves {name!r} on Ray Serve "
              f"({'full model' if args.method == 'none' else args.method or 'lazy'}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if args.ray_address is None:
            serve.shutdown()
        ray.shutdown()
    return 0

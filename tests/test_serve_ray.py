"""`trimformer serve --ray` (trimformer.serve_ray) on the shared Ray cluster, two replicas of a tiny random
Llama, over loopback: the OpenAI-shaped answers, streamed and whole, and the error bodies of bad requests
equal those of the single-process server (`trimformer.serve`); 32 concurrent chat requests are all
answered; a replica killed while requests are in flight loses none that could be sent again, the others
end in OpenAI-shaped 5xx errors, and Serve starts a new replica."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[ray]')")

from test_serve import BAD_REQUESTS, CONFIG, PROMPT, _events, _json  # noqa: E402
from test_serve import folder, server  # noqa: E402,F401  (the tiny checkpoint and the single-process server)
from trimformer.serve_ray import APP_NAME, app_builder, serve_args  # noqa: E402

OPTIONS = {"served_model_name": "tiny", "method": "lazy", "keep": 0.5, "layers": "1,3", "sinks": 2,
           "protect_last": 4, "replicas": 2, "threads_per_replica": 1, "cpus_per_replica": 0.5, "quiet": True}
REQUESTS = [      # (path, body): greedy, stop string, short prompt (full model), seeded sampling, chat
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": ["!!"]}),
    ("/v1/completions", {"prompt": "hi th", "max_tokens": 4, "temperature": 0}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 7}),
    ("/v1/completions", {"prompt": [5, 9, 40, 41, 77] * 4, "max_tokens": 5, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "answer briefly"},
                                           {"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicated(ray_cluster, folder):
    """The Ray Serve application: two model replicas behind the ingress, on a free loopback port."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"model": str(folder), **OPTIONS}), name=APP_NAME, route_prefix="/")
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}")
    serve.shutdown()


def _same(answer) -> object:
    """An answer without what differs between two answers to one request (ids and times)."""
    if isinstance(answer, (list, tuple)):
        return [_same(a) for a in answer]
    if isinstance(answer, dict):
        return {k: _same(v) for k, v in answer.items() if k not in ("id", "created")}
    return answer


def _text(events: list) -> str:
    return "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content", "")
                   for c in events[:-1] if "choices" in c and c["choices"])


def test_app_builder_takes_the_serve_options():
    args = serve_args({"model": "m", "replicas": "3", "quiet": "true", "no_revive": False, "batch-wait-ms": 5})
    assert (args.model, args.replicas, args.quiet, args.no_revive, args.batch_wait_ms) == ("m", 3, True, False, 5.0)
    assert args.ray is False and args.max_batch_size == 8 and args.threads_per_replica == 1


class _Replicas:
    """A stand-in for the model deployment's handle: each call answers `script`'s next item, a list of events
    (streamed) or an exception (raised after the events before it)."""

    def __init__(self, *script):
        self.script, self.calls = list(script), 0
        self.generate = SimpleNamespace(remote=self._remote)

    def options(self, stream: bool):
        return self

    def _remote(self, payload, chat):
        self.calls += 1
        return _Response(self.script.pop(0))


class _Response:
    def __init__(self, item):
        self.items = list(item)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.items = []


def _ingress_events(replicas: _Replicas, stream: bool) -> list:
    from trimformer.serve_ray import OpenAIRoutes

    async def collect() -> list:
        return [e async for e in OpenAIRoutes(replicas, "tiny")._events({"prompt": "x"}, stream, False)]

    return asyncio.run(collect())


def test_ingress_sends_a_request_again_while_its_client_has_seen_nothing():
    from ray.exceptions import ActorDiedError

    done = ("done", "length", {})
    replicas = _Replicas([("text", "a"), ActorDiedError()], [("text", "a"), ("text", "b"), done])
    assert _ingress_events(replicas, stream=False) == [("text", "a"), ("text", "b"), done] and replicas.calls == 2
    replicas = _Replicas([ActorDiedError()], [("text", "a"), ActorDiedError()])
    events = _ingress_events(replicas, stream=True)             # the second try had begun to stream: no third
    assert events[0] == ("text", "a") and events[1][0] == "error" and replicas.calls == 2
    assert (events[1][1].status, events[1][1].body()["error"]["code"]) == (503, "replica_lost")
    events = _ingress_events(_Replicas(*[[ActorDiedError()]] * 3), stream=False)
    assert len(events) == 1 and events[0][1].status == 503 and events[0][1].kind == "server_error"
    events = _ingress_events(_Replicas([RuntimeError("boom")]), stream=False)
    assert events[0][1].status == 500 and "boom" in events[0][1].message


def test_routes_and_whole_answers_equal_the_single_process_server(replicated, server):
    for path in ("/health", "/v1/models", "/v1/completions", "/nowhere"):
        assert _same(_json(replicated, path)) == _same(_json(server, path))
    assert _json(replicated, "/v1/models")[1]["data"][0]["id"] == "tiny"
    for path, body in REQUESTS:
        got, want = _json(replicated, path, body), _json(server, path, body)
        assert got[0] == 200 and _same(got[1]) == _same(want[1])


def test_streamed_answers_equal_the_single_process_server(replicated, server):
    for path, body in REQUESTS:
        body = {**body, "stream_options": {"include_usage": True}}
        got, want = _events(replicated, path, body), _events(server, path, body)
        assert got[-1] == "[DONE]" and len({c["id"] for c in got[:-1]}) == 1
        assert _same(got) == _same(want)


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_the_same_openai_shaped_4xx(replicated, server, path, body, status, param):
    got = _json(replicated, path, body)
    assert got == _json(server, path, body) and got[0] == status and got[1]["error"]["param"] == param
    stream = {**body, "stream": True} if isinstance(body, dict) and "stream" not in body else body
    assert _json(replicated, path, stream) == _json(server, path, stream)     # nothing streamed: plain 4xx


def test_32_concurrent_chat_requests_are_all_answered(replicated, server):
    bodies = [{"messages": [{"role": "user", "content": f"question {i}: {PROMPT[i:]}"}], "max_tokens": 6,
               "temperature": 0} for i in range(32)]
    expected = [_json(server, "/v1/chat/completions", b)[1]["choices"][0]["message"]["content"] for b in bodies]
    answers: list = [None] * len(bodies)

    def ask(i: int) -> None:
        if i % 4 == 0:
            answers[i] = _text(_events(replicated, "/v1/chat/completions", bodies[i]))
        else:
            answers[i] = _json(replicated, "/v1/chat/completions", bodies[i])[1]["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == expected


def _replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#TrimmedModel#"))


def _stream_lines(server, body: dict, begun: threading.Event, ended: threading.Event) -> tuple[int, list]:
    """A streamed completion read as it comes (http.client); `begun` is set at its first chunk, `ended` at
    its last."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = []
    for line in resp:
        if line.startswith(b"data: "):
            begun.set()
            payload = line[len(b"data: "):].strip().decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    ended.set()
    conn.close()
    return 200, events


def test_a_killed_replica_loses_no_request_that_can_be_sent_again(replicated, server):
    import ray
    from ray import serve

    bodies = [{"prompt": PROMPT[i % 2:], "max_tokens": 300, "temperature": 0} for i in range(10)]
    expected = [_json(server, "/v1/completions", b)[1]["choices"][0]["text"] for b in bodies[:2]] * 5
    results: list = [None] * len(bodies)
    begun, ended = [threading.Event() for _ in bodies], [threading.Event() for _ in bodies]

    def ask(i: int) -> None:             # the first 6 streamed, then 4 whole
        results[i] = _stream_lines(replicated, bodies[i], begun[i], ended[i]) if i < 6 else \
            _json(replicated, "/v1/completions", bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.05 if i == 5 else 0)
    victims = _replicas()
    assert len(victims) == 2
    deadline = time.monotonic() + 30     # a replica writes one stream at a time: two under way, one on each
    while (under_way := sum(b.is_set() and not e.is_set() for b, e in zip(begun, ended))) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    assert under_way >= 2, "the two replicas were never writing a stream at once"
    ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=120)

    cut = 0
    for i, (status, answer) in enumerate(results):
        if isinstance(answer, dict):                               # whole: sent again to a live replica
            assert status == 200 and answer["choices"][0]["text"] == expected[i]
        elif "error" in answer[-2]:                                # a stream the dead replica had begun
            assert answer[-1] == "[DONE]" and expected[i].startswith(_text(answer[:-1]))
            assert answer[-2]["error"]["type"] == "server_error" and answer[-2]["error"]["code"] == "replica_lost"
            cut += 1
        else:
            assert answer[-1] == "[DONE]" and _text(answer) == expected[i]
    assert cut >= 1

    deadline = time.monotonic() + 60                               # Serve starts a replica in its place
    while time.monotonic() < deadline:
        states = serve.status().applications[APP_NAME].deployments["TrimmedModel"].replica_states
        if states == {"RUNNING": 2} and victims[0] not in _replicas():
            break
        time.sleep(0.5)
    assert states == {"RUNNING": 2} and victims[0] not in _replicas()
    for body, text in zip(bodies[:4], expected):
        assert _json(replicated, "/v1/completions", body)[1]["choices"][0]["text"] == text

"""`trimformer serve` over loopback with a real HTTP client (urllib): OpenAI-shaped answers, streamed
and whole, equal to `trimformer.generation.greedy`; 4xx JSON errors; concurrent requests all answered;
the server stays up after errors."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from tiny_checkpoint import save_tiny

import trimformer
from trimformer import TrimConfig
from trimformer.generation import greedy
from trimformer.serve import Engine, Server

CONFIG = TrimConfig(method="lazy", keep=0.5, layers=(1, 3), sinks=2, protect_last=4)
PROMPT = "the quick brown fox jumps over the lazy dog while seven cats watch from a tall tree"
BAD_REQUESTS = [     # (path, body, status, the error's param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": [1, 2, 500]}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 1000}, 400, "max_tokens"),   # past the 512 context
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
    ("/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(folder):
    model, tokenizer = trimformer.load_model(str(folder))
    srv = Server(Engine(model, tokenizer, CONFIG), "tiny", ("127.0.0.1", 0)).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference(folder):
    """greedy(prompt ids, n) -> (text, token count) on the same checkpoint, trimmed alike (or not)."""
    model, tokenizer = trimformer.load_model(str(folder))

    def run(ids: list[int], n: int, trimmed: bool = True) -> tuple[str, int]:
        if trimmed:
            trimformer.trim(model, CONFIG)
        try:
            out = greedy(model, torch.tensor([ids]), n, tokenizer.eos_token_id)
        finally:
            if trimmed:
                trimformer.untrim(model)
        return tokenizer.decode(out.tokens, skip_special_tokens=True), len(out.tokens)

    return run, tokenizer


def _request(server, path: str, body=None, method: str | None = None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as exc:
        return exc


def _json(server, path: str, body=None, method: str | None = None) -> tuple[int, dict]:
    with _request(server, path, body, method) as resp:
        return resp.status, json.loads(resp.read())


def _events(server, path: str, body: dict) -> list:
    """The SSE `data:` payloads of a streamed answer (parsed JSON, and the final "[DONE]")."""
    with _request(server, path, {**body, "stream": True}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        lines = [ln.decode().rstrip("\n") for ln in resp]
    payloads = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert all(ln == "" or ln.startswith("data: ") for ln in lines)
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def _chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def test_completion_equals_greedy_generation(server, reference):
    run, tokenizer = reference
    status, body = _json(server, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 8,
                                                     "temperature": 0})
    ids = tokenizer(PROMPT)["input_ids"]
    text, n = run(ids, 8)
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == text and body["choices"][0]["index"] == 0
    assert body["choices"][0]["finish_reason"] == ("length" if n == 8 else "stop")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}


def test_streamed_chat_equals_whole_answer_and_greedy(server, reference):
    run, tokenizer = reference
    messages = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": PROMPT}]
    request = {"messages": messages, "max_tokens": 6, "temperature": 0}
    status, whole = _json(server, "/v1/chat/completions", request)
    events = _events(server, "/v1/chat/completions", {**request, "stream_options": {"include_usage": True}})
    text, n = run(_chat_ids(tokenizer, messages), 6)

    assert status == 200 and whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == text
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == n


def test_streamed_completion_and_stop_string(server, reference):
    run, _ = reference
    whole = _json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})[1]
    text = whole["choices"][0]["text"]
    events = _events(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
    stop = text[3:5]                       # the answer is cut where the stop string begins
    cut = _json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": [stop]})[1]
    assert cut["choices"][0]["text"] == text[: text.find(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    streamed = _events(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                   "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == text[: text.find(stop)]


def test_short_prompt_runs_on_the_full_model_and_seeded_sampling_repeats(server, reference):
    run, tokenizer = reference
    short = "hi th"                        # 5 tokens, fewer than sinks + protect_last: nothing to prune
    body = _json(server, "/v1/completions", {"prompt": short, "max_tokens": 4, "temperature": 0})[1]
    assert body["choices"][0]["text"] == run(tokenizer(short)["input_ids"], 4, trimmed=False)[0]
    sampled = [_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": s})[1]
               for s in (7, 7, 8)]
    texts = [b["choices"][0]["text"] for b in sampled]
    assert texts[0] == texts[1] != texts[2] and texts[0] != run(tokenizer(PROMPT)["input_ids"], 6)[0]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_openai_shaped_4xx(server, path, body, status, param):
    got, answer = _json(server, path, body)
    assert got == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert answer["error"]["message"]
    assert _json(server, "/health")[1] == {"status": "ok"}              # still up


def test_stream_error_before_output_is_a_plain_4xx(server):
    got, answer = _json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1000, "stream": True})
    assert got == 400 and answer["error"]["param"] == "max_tokens"


def test_generation_failure_is_a_500_and_the_server_carries_on(server):
    engine = server.engine

    def broken(job):
        raise RuntimeError("boom")

    engine.encode = broken
    try:
        got, answer = _json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    finally:
        del engine.encode
    assert got == 500 and answer["error"]["type"] == "server_error" and "boom" in answer["error"]["message"]
    assert _json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200


def test_concurrent_requests_are_all_answered(server):
    requests = [({"prompt": PROMPT[i:], "max_tokens": 5, "temperature": 0}, i % 2 == 0) for i in range(6)]
    expected = [_json(server, "/v1/completions", body)[1]["choices"][0]["text"] for body, _ in requests]
    answers: list = [None] * len(requests)

    def ask(i: int) -> None:
        body, stream = requests[i]
        if stream:
            events = _events(server, "/v1/completions", body)
            answers[i] = "".join(e["choices"][0]["text"] for e in events[:-1])
        else:
            answers[i] = _json(server, "/v1/completions", body)[1]["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == expected


"""Throughput of `trimformer serve` in one process against `trimformer serve --ray` with replicas, the same
total torch threads, the same chat requests.

Each server runs as its own process (``python -m trimformer serve``): the single process with
``--threads T``, the Ray Serve application with ``--replicas R --threads-per-replica T/R`` (a local Ray
cluster with T CPUs). After a warm-up (one request per replica), ``--clients`` client threads send the
``--requests`` greedy chat requests between them (all start together); requests/s is the number of requests
over the wall time from the first sent to the last answered. The answers of the two servers are compared.

    nice -n 5 .venv/bin/python benchmarks/serve_ray_throughput.py --model smollm2-135m --requests 48 \\
        --clients 8 --json benchmarks/results/serve_ray/throughput.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TOPICS = ["rivers", "volcanoes", "bridges", "libraries", "glaciers", "markets", "lighthouses", "orchards"]


def messages(i: int, sentences: int) -> list[dict[str, str]]:
    """A chat request: a paragraph (varied by `i`) and a question on it."""
    topic = TOPICS[i % len(TOPICS)]
    text = " ".join(f"Note {k} on {topic} number {i}: they change slowly, and people who live near them keep "
                    f"records of what they see each season." for k in range(sentences))
    return [{"role": "user", "content": f"{text}\n\nIn one sentence, what are these notes about?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], threads: int) -> tuple[subprocess.Popen, int]:
    """A server process; returns it and its port once it prints its address."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "trimformer", "serve", *cmd], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("trimformer serve: http://"):
            return proc, int(line.split("http://")[1].split("/")[0].split(":")[1])
    raise RuntimeError(f"the server exited ({proc.wait()}) before printing its address")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)          # Ctrl-C: the Ray server deletes its application and stops Ray
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def chat(port: int, body: dict) -> tuple[float, str]:
    """(seconds, answer text) of one whole chat request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    begin = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {payload}")
    return time.perf_counter() - begin, payload["choices"][0]["message"]["content"]


def run_load(port: int, bodies: list[dict], clients: int) -> dict:
    """Send `bodies` from `clients` threads (client c takes bodies c, c + clients, ...), all together."""
    latencies: list[float] = [0.0] * len(bodies)
    texts: list[str] = [""] * len(bodies)
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        barrier.wait()
        for i in range(c, len(bodies), clients):
            latencies[i], texts[i] = chat(port, bodies[i])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    begin = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - begin
    return {"seconds": round(seconds, 2), "requests_per_s": round(len(bodies) / seconds, 3),
            "median_latency_s": round(statistics.median(latencies), 2), "texts": texts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="lazy")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=12, help="paragraph length of each prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all, for each server")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--json", default="benchmarks/results/serve_ray/throughput.json")
    args = parser.parse_args()
    if args.threads % args.replicas:
        parser.error("--threads must be a multiple of --replicas")
    per_replica = args.threads // args.replicas

    bodies = [{"messages": messages(i, args.sentences), "max_tokens": args.max_tokens, "temperature": 0}
              for i in range(args.requests)]
    common = ["--model", args.model, "--method", args.method, "--quiet"]
    servers = {
        "single": (common + ["--port", "0", "--threads", str(args.threads)], args.threads, 1),
        "ray": (common + ["--ray", "--port", str(free_port()), "--replicas", str(args.replicas),
                          "--threads-per-replica", str(per_replica), "--max-batch-size", str(args.max_batch_size)],
                per_replica, args.replicas),
    }
    results: dict[str, dict] = {}
    for name, (cmd, threads, replicas) in servers.items():
        begin = time.perf_counter()
        proc, port = start(cmd, threads)
        try:
            ready = time.perf_counter() - begin
            run_load(port, bodies[:replicas], replicas)                   # warm-up: a request per replica
            results[name] = {"command": "trimformer serve " + " ".join(cmd), "startup_s": round(ready, 1),
                             **run_load(port, bodies, args.clients)}
        finally:
            stop(proc)
        print(f"{name}: {results[name]['requests_per_s']} requests/s ({args.requests} in "
              f"{results[name]['seconds']} s, median latency {results[name]['median_latency_s']} s)", flush=True)

    same = sum(a == b for a, b in zip(results["single"].pop("texts"), results["ray"].pop("texts")))
    ratio = results["ray"]["requests_per_s"] / results["single"]["requests_per_s"]
    out = {"model": args.model, "method": args.method, "requests": args.requests, "clients": args.clients,
           "max_tokens": args.max_tokens, "prompt_sentences": args.sentences, "threads_in_all": args.threads,
           "replicas": args.replicas, "cpus": os.cpu_count(), "servers": results,
           "ray_over_single": round(ratio, 3), "same_answers": f"{same}/{args.requests}"}
    print(f"ray / single: {ratio:.2f}x; same answers {same}/{args.requests}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

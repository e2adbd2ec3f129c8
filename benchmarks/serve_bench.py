"""Time to first streamed token of `trimformer serve` over loopback, full model vs trimmed, with 1 and
with N concurrent clients.

For each method the script starts ``python -m trimformer serve`` (its own process, ``--threads``),
warms it up with one short request, then, for each client count C, lets C client threads send
``--requests`` streamed /v1/completions requests between them (all clients start together). TTFT is
measured by the client: from sending the request to the first SSE chunk that carries text, so with
C > 1 it includes the wait in the server's queue. The prompts are needle-in-a-haystack prompts of
exactly ``--length`` tokens (PG essays, the question at the end; one per request, different needles),
sent as token ids; "found" counts answers that hold the needle's number.

    nice -n 5 .venv/bin/python benchmarks/serve_bench.py --model smollm2-135m --length 4096 \\
        --requests 4 --clients 1,4 --methods none,lazy --threads 1 --json results/serve_bench.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from trimformer.loading import load_model
from trimformer_lab.evaluation.needle import make_needle


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def start_server(model: str, method: str, threads: int) -> tuple[subprocess.Popen, int]:
    """`trimformer serve` on a free loopback port; returns the process and its port."""
    cmd = [sys.executable, "-m", "trimformer", "serve", "--model", model, "--method", method, "--port", "0",
           "--threads", str(threads), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def stream_request(port: int, ids: list[int], max_tokens: int) -> tuple[float, float, str]:
    """(TTFT s, total s, text) of one streamed completion."""
    body = json.dumps({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    ttft, parts = None, []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        text = json.loads(line[6:])["choices"][0]["text"]
        if text and ttft is None:
            ttft = time.perf_counter() - start
        parts.append(text)
    total = time.perf_counter() - start
    conn.close()
    return ttft if ttft is not None else total, total, "".join(parts)


def run_setting(port: int, prompts: list[tuple[list[int], str]], clients: int, max_tokens: int) -> list[dict]:
    """Send `prompts` from `clients` threads (client c takes prompts c, c + clients, ...), together."""
    results: list[dict] = [{} for _ in prompts]
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for i in range(c, len(prompts), clients):
            ids, answer = prompts[i]
            ttft, total, text = stream_request(port, ids, max_tokens)
            results[i] = {"ttft_s": ttft, "total_s": total, "found": answer in text}

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=4, help="requests per setting (default: %(default)s)")
    parser.add_argument("--clients", default="1,4", help="concurrent client counts (default: %(default)s)")
    parser.add_argument("--methods", default="none,lazy", help="serve --method values; none = the full model")
    parser.add_argument("--max-tokens", type=int, default=10, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    _, tokenizer = load_model(args.model)
    prompts = []
    for i in range(args.requests):
        needle = make_needle(tokenizer, args.length, depth=(i + 1) / (args.requests + 1), seed=1000 + i)
        prompts.append((needle.input_ids[0].tolist(), needle.answer))
    warm = make_needle(tokenizer, 1024, depth=0.5, seed=999).input_ids[0].tolist()
    rows = []
    for method in args.methods.split(","):
        proc, port = start_server(args.model, method, args.threads)
        try:
            stream_request(port, warm, 2)
            for c in clients:
                results = run_setting(port, prompts, c, args.max_tokens)
                ttfts = [r["ttft_s"] for r in results]
                row = {"method": "full" if method == "none" else method, "clients": c, "requests": len(results),
                       "median_ttft_s": statistics.median(ttfts), "p95_ttft_s": percentile(ttfts, 95),
                       "median_total_s": statistics.median(r["total_s"] for r in results),
                       "found": sum(r["found"] for r in results), "ttft_s": ttfts}
                rows.append(row)
                print(f"{row['method']:>6} clients={c} median TTFT {row['median_ttft_s']:.2f} s  "
                      f"p95 {row['p95_ttft_s']:.2f} s  found {row['found']}/{len(results)}", flush=True)
        finally:
            proc.terminate()
            proc.wait()
    print("\n| method | clients | requests | median TTFT s | p95 TTFT s | median total s | needle found |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['clients']} | {r['requests']} | {r['median_ttft_s']:.2f} | {r['p95_ttft_s']:.2f} "
              f"| {r['median_total_s']:.2f} | {r['found']}/{r['requests']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

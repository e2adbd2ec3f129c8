"""Where a `runtime` decode step's own work goes: wall time inside trimformer's hooks, per step.

Prefills one needle prompt with the model trimmed by `--config`, then runs `--steps` greedy decode steps,
timing each call of the decoder adapter's hooks and of the runtime's eviction and readmission functions
(perf_counter around each call; no profiler, so the figures are the calls' own wall time). Prints the
step time and, per function, ms per step, calls and us per call. Nested rows are included in their
parents: `layer post-hook` holds readmission and the evictions flushed at checking layers, `base-model
post-hook` the evictions of the layers after the last check, `eviction (per flush)` one selection for the
layers it evicts and their moves, `attention` the layer's attention kernel (or the decode probe's own
softmax on scoring steps).

    .venv/bin/python benchmarks/decode_hook_times.py --length 4096 --threads 2 --config '{"budget": 0.5}'
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time

import torch

from trimformer import trim, untrim
from trimformer.generation import GreedyStream
from trimformer.loading import load_model
from trimformer.mechanisms import eviction as runtime
from trimformer.patch import attention_hook
from trimformer.patch import llama as decoder
from trimformer_lab.evaluation.needle import make_needle

TOTAL: collections.Counter = collections.Counter()   # seconds per timed name
CALLS: collections.Counter = collections.Counter()


def timed(name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TOTAL[name] += time.perf_counter() - start
            CALLS[name] += 1
    return wrapper


def instrument() -> None:
    """Wrap the hooks and runtime functions (before the model is trimmed, so the hooks it installs are the
    wrapped ones)."""
    for name, label in (("_evict", "eviction (per flush)"), ("_to_shadow", "eviction: to the shadow set"),
                        ("_readmit", "readmission check"), ("_readmit_positions", "bring back in another layer")):
        setattr(runtime.RuntimeEviction, name, timed(label, getattr(runtime.RuntimeEviction, name)))
    for name, label in (("_on_start", "base-model pre-hook"), ("_on_end", "base-model post-hook")):
        setattr(decoder.LlamaPatch, name, timed(label, getattr(decoder.LlamaPatch, name)))
    pre, post = decoder.LlamaPatch._layer_pre, decoder.LlamaPatch._layer_post
    decoder.LlamaPatch._layer_pre = lambda self, layer: timed("layer pre-hook", pre(self, layer))
    decoder.LlamaPatch._layer_post = lambda self, layer: timed("layer post-hook", post(self, layer))
    wrap = attention_hook._wrap
    attention_hook._wrap = lambda original: timed("attention", wrap(original))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default='{"budget": 0.5}', help="JSON runtime options")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    instrument()
    model, tokenizer = load_model(args.model)
    ids = make_needle(tokenizer, args.length, depth=0.5, seed=args.length).input_ids
    trim(model, {"method": "runtime", **json.loads(args.config)})

    def count_from_here(cache) -> None:   # the prefill's hook calls are not counted
        TOTAL.clear()
        CALLS.clear()

    try:
        stream = GreedyStream(model, ids, args.steps + 1, on_prefill=count_from_here, time_steps=True)
        for _ in stream:
            pass
        elapsed = sum(stream.step_s)
    finally:
        untrim(model)
    print(f"{args.steps} steps after a {args.length}-token prompt: {elapsed / args.steps * 1000:.1f} ms a step")
    for name, seconds in TOTAL.most_common():
        print(f"  {name:30s} {seconds / args.steps * 1000:6.2f} ms/step   {CALLS[name]:6d} calls "
              f"{seconds / CALLS[name] * 1e6:8.1f} us/call")


if __name__ == "__main__":
    main()

"""Throughput of `trimformer batch`: one process with N torch threads beside Ray Data with N actors of one
thread each (the same threads in all), on the same LongBench-style prompts.

Each prompt is a passage of about `--length` tokens of the Paul Graham essays (a different stretch each)
followed by a question about it, wrapped in the chat template; answers are greedy, `--new-tokens` long at
most, from the trimmed model (`--method`). Each mode answers every line through the generator
`trimformer batch` writes from (`trimformer.batch.answers`, `trimformer.batch_ray.answers`). Two rates per
mode: the whole job (from its start, model loading and actor start included, the Ray cluster's own start
timed apart, to its last answer) and the steady one (answers after the first / the time from the first
answer to the last). Prints and writes both, their ratios, and whether the two modes' answers agree.

    .venv/bin/python benchmarks/batch_throughput.py --model smollm2-135m --prompts 40 --new-tokens 16 \\
        --json benchmarks/results/batch/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from trimformer import TrimConfig
from trimformer.batch import answers, scan
from trimformer.batch_engine import Item, Spec
from trimformer.batch_ray import answers as ray_answers
from trimformer.loading import load_model
from trimformer_lab.evaluation.needle import load_essays

QUESTION = "What is the main point the author makes in the passage above? Answer in one sentence."


def build_prompts(model: str, count: int, length: int) -> list[str]:
    """`count` passages of `length` tokens of the essays (consecutive stretches, wrapping), each + QUESTION."""
    _, tokenizer = load_model(model)
    hay = tokenizer(load_essays(), add_special_tokens=False)["input_ids"]
    stride = max(1, (len(hay) - length) // count)
    return [f"{tokenizer.decode(hay[i * stride: i * stride + length])}\n\n{QUESTION}" for i in range(count)]


def timed(items: list[Item], stream) -> tuple[dict[str, float], dict[int, dict]]:
    """Rates of one mode, and its records by id; `stream` () -> the (line, record) generator to drain."""
    start = time.perf_counter()
    records, stamps = {}, []
    for _, record in stream():
        if "error" in record:
            raise RuntimeError(f"line {record['line']} failed: {record['error']}")
        records[record["id"]] = record
        stamps.append(time.perf_counter() - start)
    if len(records) != len(items):
        raise RuntimeError(f"{len(records)} answers for {len(items)} lines")
    n = len(items)
    return {"seconds": round(stamps[-1], 2), "first_answer_s": round(stamps[0], 2),
            "prompts_per_s": round(n / stamps[-1], 4),
            "steady_prompts_per_s": round((n - 1) / (stamps[-1] - stamps[0]), 4)}, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="lazy")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--length", type=int, default=1024, help="passage tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="threads of the single process = actors x 1 thread")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="batchbench"))
    try:
        src = work / "prompts.jsonl"
        prompts = build_prompts(args.model, args.prompts, args.length)
        src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
        items = list(scan(src))
        config = None if args.method == "none" else TrimConfig(method=args.method)
        spec = Spec(args.model, config, args.new_tokens, threads=args.threads)
        single_rates, single = timed(items, lambda: answers(spec.engine(), items))
        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.threads, include_dashboard=False, _temp_dir=str(work / "ray"))
        ray_init_s = time.perf_counter() - start
        try:
            ray_rates, many = timed(items, lambda: ray_answers(items, spec, actors=args.threads, threads_per_actor=1))
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tokens = [r["prompt_tokens"] for r in single.values()]
    result = {
        "model": args.model, "method": args.method, "prompts": args.prompts, "passage_tokens": args.length,
        "prompt_tokens_mean": round(sum(tokens) / len(tokens), 1), "max_new_tokens": args.new_tokens,
        "threads": args.threads, "ray_actors": args.threads, "threads_per_actor": 1,
        "single_process": single_rates,
        "ray": {**ray_rates, "cluster_start_s": round(ray_init_s, 2)},
        "ray_over_single": round(ray_rates["prompts_per_s"] / single_rates["prompts_per_s"], 3),
        "ray_over_single_steady": round(ray_rates["steady_prompts_per_s"] / single_rates["steady_prompts_per_s"], 3),
        "same_answers": sum(single[i]["answer"] == many[i]["answer"] for i in single),
        "kept_fraction_mean": round(sum(r["kept_fraction"] for r in single.values()) / len(single), 4),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                    "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""What halving the KV cache could buy a decode step at most, with no eviction work at all.

Times greedy decode steps of the unpatched model after needle prompts of `--length` tokens (transformers'
`DynamicCache`, then the in-place cache), of `--length // 2` and of 128 tokens (in-place cache), and of a
`runtime` decoder with no budget and no readmission (its hooks and periodic scoring, nothing evicted), in
alternating rounds. Prints the median step time per decoder and round.

    .venv/bin/python benchmarks/decode_ceiling.py --length 4096 --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from trimformer import trim, untrim
from trimformer.loading import load_model
from trimformer_lab.bench import step_times
from trimformer_lab.evaluation.needle import make_needle

SKIP = 8   # steps left out of each median (warm-up)


def median_step_ms(model, ids: torch.Tensor, steps: int, in_place: bool) -> float:
    return statistics.median(step_times(model, ids, steps, in_place)[SKIP:]) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.steps <= SKIP:
        raise SystemExit(f"--steps must be more than {SKIP}: the first {SKIP} steps are not counted")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    prompt = lambda n: make_needle(tokenizer, n, depth=0.5, seed=args.length).input_ids
    half = args.length // 2

    def runtime_unbounded(ids: torch.Tensor) -> float:
        trim(model, {"method": "runtime", "budget": None, "readmit_every": 0})
        try:
            return median_step_ms(model, ids, args.steps, in_place=False)
        finally:
            untrim(model)

    decoders = {
        f"unpatched, DynamicCache, {args.length}-token prompt": lambda: median_step_ms(model, prompt(args.length), args.steps, False),
        f"unpatched, in-place cache, {args.length}-token prompt": lambda: median_step_ms(model, prompt(args.length), args.steps, True),
        f"unpatched, in-place cache, {half}-token prompt": lambda: median_step_ms(model, prompt(half), args.steps, True),
        "unpatched, in-place cache, 128-token prompt": lambda: median_step_ms(model, prompt(128), args.steps, True),
        f"runtime, no budget, no readmission, {args.length}-token prompt": lambda: runtime_unbounded(prompt(args.length)),
    }
    results = {name: [] for name in decoders}
    for _ in range(args.rounds):
        for name, run in decoders.items():
            results[name].append(run())
    print(f"median ms per decode step, {args.threads} thread(s), rounds 1..{args.rounds}")
    for name, values in results.items():
        print(f"{name:65s} " + " / ".join(f"{v:.0f}" for v in values))


if __name__ == "__main__":
    main()

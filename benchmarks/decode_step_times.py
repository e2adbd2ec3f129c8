"""Per-step decode times of `runtime` configurations against the in-place cache, by step phase.

Prefills one needle prompt, then times each of `--steps` greedy decode steps, for the unpatched model with
the in-place cache, for each configuration, and for the ceiling (the unpatched model, in-place cache, on the
prompt's last `--length // 2 + 16` tokens: about a 0.5 budget's cache, with no scoring, eviction or
readmission work), in alternating rounds. Prints the summed time of all steps,
then the mean step time and the median per step index modulo 8 (eviction runs every 8 steps by default, so
the 8 columns show what each kind of step costs); those two leave out the first 16 steps (the first
eviction halves the cache at step 8).

    .venv/bin/python benchmarks/decode_step_times.py --length 4096 \\
        --configs '[{"budget": 0.5}, {"budget": 0.5, "readmit_every": 0}, {"budget": 0.5, "readmit_layers": null}]'
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from trimformer import trim, untrim
from trimformer.loading import load_model
from trimformer_lab.bench import step_times
from trimformer_lab.evaluation.needle import make_needle

SKIP = 16


def summary(times: list[float]) -> str:
    total = sum(times)                      # every step, the first SKIP included
    times = times[SKIP:]
    by_phase = [statistics.median(t for j, t in enumerate(times) if (j + SKIP) % 8 == r) * 1000 for r in range(8)]
    return f"total {total:6.1f} s | mean {statistics.mean(times) * 1000:6.1f} ms | by step mod 8: " + " ".join(f"{v:.0f}" for v in by_phase)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default='[{"budget": 0.5}]', help="JSON list of runtime options")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (needle prompts, as bench decode)")
    args = p.parse_args()
    if args.steps < SKIP + 8:
        raise SystemExit(f"--steps must be at least {SKIP + 8}: the first {SKIP} steps are not counted, "
                         "and each of the 8 step phases needs one")
    torch.set_num_threads(args.threads)
    configs = json.loads(args.configs)
    model, tokenizer = load_model(args.model)
    ids = torch.cat([make_needle(tokenizer, args.length, depth=(0.5 + 0.618 * row) % 1.0, seed=args.length + row).input_ids
                     for row in range(args.batch)])                  # (batch, length), the rows of `bench decode`
    for _ in range(args.rounds):
        print(f"{'in-place cache, no eviction':60s} {summary(step_times(model, ids, args.steps, True))}", flush=True)
        for config in configs:
            trim(model, {"method": "runtime", **config})
            try:
                print(f"{json.dumps(config):60s} {summary(step_times(model, ids, args.steps, False))}", flush=True)
            finally:
                untrim(model)
        ceiling = ids[:, -(args.length // 2 + 16):]
        print(f"{f'ceiling: unpatched, in-place, last {ceiling.shape[1]} tokens':60s} "
              f"{summary(step_times(model, ceiling, args.steps, True))}", flush=True)


if __name__ == "__main__":
    main()

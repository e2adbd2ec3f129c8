"""Multi-needle sequential recall: does readmission bring back needles evicted while decoding?

Each prompt hides four needles ("The special magic number for <city> is <7 digits>.") at random depths
of a PG-essay haystack and asks for the four numbers, one per line, in a given order. The model writes a
preamble first ("The special magic numbers for ... are:"), so a decode-time evicting cache has dropped
part of the prompt before the first number is written: a needle that is gone must come back through the
shadow set. Score: numbers found in the greedy answer (4 per prompt). For every trimmed variant the
script also records the mean share of the tokens seen that the KV cache held over the decoding steps
(readmitted tokens count until the next eviction takes the cache back to its budget).

    .venv/bin/python benchmarks/readmit_multineedle.py --length 2048 --prompts 12 --threads 1 \\
        --json results/runtime/readmit_multineedle.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from trimformer import stats, trim, untrim
from trimformer.loading import load_model
from trimformer_lab.evaluation.needle import CITIES, NEEDLE, _haystack_ids, _sentence_end_before, chat_parts

OWN = {"readmit_threshold": 3.0, "readmit_max": 32, "readmit_layers": None}   # every layer checks its own shadow set
VARIANTS = {
    "full": None,
    "no readmission": {"budget": 0.5, "readmit_every": 0},
    "readmit (defaults: every step, 3x, layers 5/15/25 for all)": {"budget": 0.5},
    "readmit every step, 3x, layers 2/7/.../27 for all": {"budget": 0.5, "readmit_layers": [2, 7, 12, 17, 22, 27]},
    "readmit every step, 3x, layers 12/15/18 for all": {"budget": 0.5, "readmit_layers": [12, 15, 18]},
    "own layer every step, 3x": {"budget": 0.5, **OWN},
    "own layer every 4 steps, 10x, max 8": {"budget": 0.5, "readmit_every": 4, "readmit_threshold": 10.0,
                                                            "readmit_max": 8, "readmit_layers": None},
}
NEEDLES = 4


def make_prompt(tokenizer, length: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(1, length) prompt ids and the numbers, in the order asked."""
    rng = random.Random(seed)
    cities = rng.sample(CITIES, NEEDLES)
    numbers = [str(rng.randrange(1_000_000, 10_000_000)) for _ in cities]
    question = (f"List the special magic numbers for {', '.join(cities[:-1])} and {cities[-1]} mentioned in the "
                "text above, one per line, in that order.")
    head, tail = chat_parts(tokenizer, question)
    needles = [tokenizer(" " + NEEDLE.format(city=c, number=n), add_special_tokens=False)["input_ids"]
               for c, n in zip(cities, numbers)]
    budget = length - len(head) - len(tail) - sum(map(len, needles))
    hay = _haystack_ids(tokenizer, None)[seed * 997: seed * 997 + budget]
    if len(hay) < budget:
        raise SystemExit(f"prompt {seed}: the essays hold too few tokens for --length {length}; "
                         "use a shorter --length or fewer --prompts")
    cuts = [_sentence_end_before(tokenizer, hay, int(d * budget))
            for d in sorted(rng.uniform(0.05, 0.95) for _ in cities)]
    ids, previous = list(head), 0
    for cut, needle in zip(cuts, needles):
        ids += hay[previous:cut] + needle
        previous = cut
    return torch.tensor([ids + hay[previous:] + tail]), numbers


def run_variant(model, tokenizer, ids: torch.Tensor, numbers: list[str], config: dict | None,
                new_tokens: int) -> dict:
    shares: list[float] = []

    def record(module, args, output):   # after each forward: cache share of the tokens seen
        s = stats(model)
        seen = sum(layer["seen"] for layer in s["per_layer"])
        shares.append(sum(layer["in_cache"] for layer in s["per_layer"]) / max(seen, 1))

    handle = None
    if config is not None:
        trim(model, {"method": "runtime", **config})
        handle = model.register_forward_hook(record)
    try:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        readmitted = stats(model)["total_tokens_reintroduced"] if config is not None else 0
    finally:
        if handle is not None:
            handle.remove()
            untrim(model)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    decode_shares = shares[1:]   # the first forward is the prefill (nothing evicted yet)
    return {"found": sum(n in text.replace(",", "") for n in numbers), "readmitted": readmitted,
            "mean_kv_share": sum(decode_shares) / len(decode_shares) if decode_shares else 1.0, "text": text}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens")
    p.add_argument("--prompts", type=int, default=12, help="prompts (seeds 0..N-1)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + prompts - 1")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="a subset of the variants (full always runs)")
    p.add_argument("--new-tokens", type=int, default=72)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    variants = {name: VARIANTS[name] for name in (args.variants or VARIANTS)}
    if "full" not in variants:
        variants = {"full": None, **variants}
    records: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in tqdm(range(args.first_seed, args.first_seed + args.prompts), desc="prompts"):
        ids, numbers = make_prompt(tokenizer, args.length, seed)
        for name, config in variants.items():
            records[name].append({"seed": seed, **run_variant(model, tokenizer, ids, numbers, config, args.new_tokens)})
    full = [r["found"] for r in records["full"]]
    rows = []
    print(f"{'variant':42s} {'found':>7s} {'where full finds >= 2':>22s} {'mean KV share':>14s} {'readmitted':>11s}")
    for name, recs in records.items():
        found = sum(r["found"] for r in recs)
        strong = sum(r["found"] for r, f in zip(recs, full) if f >= 2)
        share = sum(r["mean_kv_share"] for r in recs) / len(recs)
        readmitted = sum(r["readmitted"] for r in recs)
        rows.append({"variant": name, "config": variants[name], "found": found, "of": NEEDLES * len(recs),
                     "found_where_full_ge_2": strong, "mean_kv_share": share, "readmitted": readmitted})
        print(f"{name:42s} {found:3d}/{NEEDLES * len(recs):<3d} {strong:22d} {share:14.3f} {readmitted:11d}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": rows, "records": records}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

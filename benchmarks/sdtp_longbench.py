"""LongBench items (the evaluation harness's prompts and metrics) under full, lazy, random and sdtp at one
explicit schedule, scored per item and printed as they finish. `trimformer eval longbench --method
sdtp,lazy,random --config '{"schedule": {"4": 0.5, "8": 0.7}}'` runs the same comparison with the
resumable results file, TTFT and tables.

    .venv/bin/python benchmarks/sdtp_longbench.py --schedule 4:0.5,8:0.7 --tasks hotpotqa,2wikimqa --limit 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import trimformer
from trimformer_lab.evaluation.tasks import longbench_items
from trimformer.generation import greedy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", required=True)
    ap.add_argument("--methods", default="sdtp,lazy,random")
    ap.add_argument("--pruner", default=None)
    ap.add_argument("--tasks", default="hotpotqa,2wikimqa,multifieldqa_en,qasper")
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schedule = {int(a): float(b) for a, b in (x.split(":") for x in args.schedule.split(","))}
    model, tok = trimformer.load_model("smollm2-135m")
    items = [it for its in longbench_items(tok, None, args.tasks.split(","), args.limit, args.budget).values()
             for it in its]
    methods = ["full"] + args.methods.split(",")
    scores: dict[str, list[float]] = {m: [] for m in methods}
    for it in items:
        for m in methods:
            if m != "full":
                extra = {"pruner": args.pruner} if m == "sdtp" and args.pruner else {}
                trimformer.trim(model, method=m, schedule=schedule, **extra)
            out = greedy(model, it.input_ids, it.max_new_tokens, tok.eos_token_id)
            if m != "full":
                trimformer.untrim(model)
            text = tok.decode(out.tokens, skip_special_tokens=True)
            score = it.score(text)
            scores[m].append(score)
            print(f"{it.task}:{it.id} {m:>6} {score:.3f} {text[:60]!r}", flush=True)
    print("\nmean score over", len(items), "items:")
    for m in methods:
        print(f"  {m:>6}: {sum(scores[m]) / len(scores[m]):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"schedule": schedule, "items": [f"{i.task}:{i.id}" for i in items],
                                               "scores": scores}, indent=2) + "\n")


if __name__ == "__main__":
    main()

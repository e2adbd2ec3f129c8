"""Learned (SDTP) vs lazy vs random scores at one keep schedule, on needles in a haystack.

The needles are those of tests/test_smollm2.py: make_needle(tokenizer, LENGTH, depth, seed=i) for depths
0.1..0.9, answered greedily. For each variant and needle it records whether the answer holds the number,
whether every needle token was still live at the last layer after prefill (before any revival), the
first-step KL divergence from the full model, greedy-token agreement with the full model, and TTFT.

    .venv/bin/python benchmarks/sdtp_compare.py --schedule 4:0.5,8:0.7 \
        --variant lazy --variant random --variant sdtp=out/sdtp/pruner --json out/sdtp/needle.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import trimformer
from trimformer.generation import GreedyStream
from trimformer_lab.evaluation.needle import found, make_needle

DEPTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def run(model, ids, max_new: int, eos: int):
    """Greedy tokens, the prefill's last-position logits (1, V), TTFT, and the positions live at the last
    layer after the prefill (None on the full model)."""
    after: dict = {}

    def after_prefill(cache) -> None:
        after["logits"] = stream.logits.float()
        state = getattr(cache, "_trimformer_state", None)
        if state is not None:
            slots = state.slots[-1]
            after["live"] = set(slots.positions[0][slots.valid[0]].tolist())

    stream = GreedyStream(model, ids, max_new, eos, on_prefill=after_prefill)
    tokens = [int(token[0]) for token in stream]
    return tokens, after["logits"], stream.ttft_s, after.get("live")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", required=True, help="layer:keep pairs, e.g. 4:0.5,8:0.7")
    ap.add_argument("--variant", action="append", required=True,
                    help="lazy | random | sdtp=PRUNER_PATH[:label] (repeatable)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--max-new", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-revive", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--full-cache", default=None, help="reuse the full model's answers and logits from this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schedule = {int(a): float(b) for a, b in (x.split(":") for x in args.schedule.split(","))}
    model, tok = trimformer.load_model("smollm2-135m")
    items = [make_needle(tok, args.length, d, seed=i) for i, d in enumerate(DEPTHS)]

    variants = []
    for v in args.variant:
        if v.startswith("sdtp="):
            path, _, label = v[5:].partition(":")
            variants.append((label or f"sdtp({Path(path).name})", {"method": "sdtp", "pruner": path}))
        else:
            variants.append((v, {"method": v}))

    results = {"schedule": schedule, "length": args.length, "revive": not args.no_revive, "rows": {}}
    full = []
    cache = Path(args.full_cache) if args.full_cache else None
    cached = torch.load(cache) if cache is not None and cache.exists() else None
    for k, it in enumerate(items):
        if cached is not None and cached["length"] == args.length:
            tokens, logits, ttft = cached["tokens"][k], cached["logits"][k], cached["ttft"][k]
        else:
            tokens, logits, ttft, _ = run(model, it.input_ids, args.max_new, tok.eos_token_id)
        full.append((tokens, logits))
        ok = found(it.answer, tok.decode(tokens))
        results["rows"].setdefault("full", []).append({"depth": it.depth, "found": ok, "ttft": ttft,
                                                       "answer": tok.decode(tokens)})
        print(f"full   depth {it.depth:.1f}: {'FOUND' if ok else 'miss '} {tok.decode(tokens)!r} ({ttft:.1f}s)", flush=True)
    if cache is not None and cached is None:
        torch.save({"length": args.length, "tokens": [f[0] for f in full], "logits": [f[1] for f in full],
                    "ttft": [r["ttft"] for r in results["rows"]["full"]]}, cache)
    for label, options in variants:
        extra = {"revive": False} if args.no_revive else {}
        trimformer.trim(model, schedule=schedule, **options, **extra)
        rows = []
        for it, (ftoks, flogits) in zip(items, full):
            tokens, logits, ttft, live = run(model, it.input_ids, args.max_new, tok.eos_token_id)
            kept = trimformer.stats(model)["kept_fraction"]
            needle = set(range(it.needle_start, it.needle_end))
            kl = float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(flogits, -1), log_target=True,
                                reduction="sum"))
            agree = 0
            for a, b in zip(tokens, ftoks):
                if a != b:
                    break
                agree += 1
            row = {"depth": it.depth, "found": found(it.answer, tok.decode(tokens)), "ttft": ttft,
                   "needle_live": len(needle & live) / len(needle), "kl": kl,
                   "agree": agree / max(1, len(ftoks)), "kept_fraction": kept, "answer": tok.decode(tokens)}
            rows.append(row)
            print(f"{label:>6} depth {it.depth:.1f}: {'FOUND' if row['found'] else 'miss '} needle live "
                  f"{row['needle_live']:.0%} KL {kl:.3f} {row['answer']!r} ({ttft:.1f}s)", flush=True)
        trimformer.untrim(model)
        results["rows"][label] = rows
    print("\nsummary (found / needle fully live at the last layer / mean first-token KL / mean greedy agreement):")
    nf = sum(r["found"] for r in results["rows"]["full"])
    print(f"  {'full':>22}: {nf}/{len(items)}")
    for label, rows in results["rows"].items():
        if label == "full":
            continue
        print(f"  {label:>22}: {sum(r['found'] for r in rows)}/{len(rows)}, "
              f"{sum(r['needle_live'] == 1.0 for r in rows)}/{len(rows)} live, "
              f"KL {sum(r['kl'] for r in rows) / len(rows):.3f}, agree {sum(r['agree'] for r in rows) / len(rows):.2f}, "
              f"kept {rows[0]['kept_fraction']:.1%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

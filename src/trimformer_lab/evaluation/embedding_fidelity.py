"""Sentence-embedding fidelity of a trimmed encoder: cosine of mean-pooled embeddings, trimmed vs full.

    python -m trimformer_lab.evaluation.embedding_fidelity --model minilm-l6 \
        --config '{"method": "tome", "reduction_ratio": 0.3}' --json out.json

reads SST-2 sentences (sst2/dev.tsv, column `text`) and QNLI questions and sentences (qnli/dev.tsv) from
the shared data folder, embeds each with the full model and the trimmed one (same batches, in one
process), and reports the mean, minimum and 5th percentile cosine, the share of token-layer work done
and the FLOP ratio. With --student DIR (an encoder fine-tuned to work merged, `trimformer train-merge`)
the trimmed embeddings come from that encoder and the full ones from --model. With --throughput R it also
times the encoder, full vs trimmed, on the first --throughput-sentences QNLI sentences in batches of
--batch: one process, a warm-up of each, then R rounds alternating full and trimmed, medians of the
per-round times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from trimformer.api import stats, trim, untrim
from trimformer.loading import load_model

from ..data import SHARED_DATA, read_sentences
from ..embedding import embedding_fidelity, load_encoder


@torch.inference_mode()
def embedding_throughput(model, tokenizer, sentences: list[str], config: dict, batch: int = 32,
                         rounds: int = 7) -> dict:
    """Sentences per second of the encoder, full vs trimmed, on `sentences` tokenized once (padded per
    batch): a warm-up of each, then `rounds` rounds alternating full and trimmed; medians."""
    batches = [tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=128,
                         return_tensors="pt") for i in range(0, len(sentences), batch)]

    def forward(enc) -> None:
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], token_type_ids=enc.get("token_type_ids"))

    def run_all() -> float:
        start = time.perf_counter()
        for enc in batches:
            forward(enc)
        return time.perf_counter() - start

    kept, ratios = [], []
    trim(model, dict(config))
    try:
        for enc in batches:                                   # warm-up of the trimmed model, and its stats
            forward(enc)
            s = stats(model)
            kept.append((s["kept_fraction"], s["flops_full"]))
            ratios.append((s["flops_full"], s["flops_trimmed"]))
    finally:
        untrim(model)
    run_all()                                                 # warm-up of the full model
    full_t, trimmed_t = [], []
    for _ in range(rounds):
        full_t.append(run_all())
        trim(model, dict(config))
        try:
            trimmed_t.append(run_all())
        finally:
            untrim(model)
    full, trimmed = statistics.median(full_t), statistics.median(trimmed_t)
    n = len(sentences)
    flops_full = sum(f for f, _ in ratios)
    return {
        "sentences": n,
        "batch": batch,
        "rounds": rounds,
        "mean_tokens": sum(int(e["attention_mask"].sum()) for e in batches) / n,
        "full_sentences_per_s": n / full,
        "trimmed_sentences_per_s": n / trimmed,
        "speedup": full / trimmed,
        "flop_ratio": flops_full / sum(t for _, t in ratios),
        "kept_fraction": sum(k * f for k, f in kept) / flops_full,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trimformer_lab.evaluation.embedding_fidelity",
                                description="cosine of mean-pooled embeddings, trimmed vs full")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--config", default='{"method": "tome", "reduction_ratio": 0.3}',
                   help="trim configuration as JSON (default: %(default)s)")
    p.add_argument("--student", default=None,
                   help="trim this encoder folder instead (e.g. from `trimformer train-merge`) and compare it with "
                        "--model unpruned")
    p.add_argument("--tasks", default="sst2,qnli")
    p.add_argument("--data", default=str(SHARED_DATA))
    p.add_argument("--limit", type=int, default=None, help="sentences per task (default: all)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--throughput", type=int, default=0, metavar="ROUNDS",
                   help="also time full vs trimmed on QNLI sentences, this many alternating rounds (0: off)")
    p.add_argument("--throughput-sentences", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    reference = None
    if args.student:
        reference, (model, tokenizer) = model, load_encoder(args.student)
    config = json.loads(args.config)
    results = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        sentences = read_sentences(task, args.data, args.limit)
        row = {"task": task, "model": args.model, "student": args.student, "config": config,
               **embedding_fidelity(model, tokenizer, sentences, config, args.batch, reference)}
        results.append(row)
        print(f"{task}: {row['sentences']} sentences, mean cosine {row['mean_cosine']:.4f}, "
              f"p05 {row['p05_cosine']:.4f}, min {row['min_cosine']:.4f}, kept {row['kept_fraction']:.3f}, "
              f"flop ratio {row['flop_ratio']:.2f}x", flush=True)
    if args.throughput:
        sentences = read_sentences("qnli", args.data, args.throughput_sentences)
        row = {"task": "throughput-qnli", "model": args.model, "config": config,
               **embedding_throughput(model, tokenizer, sentences, config, args.batch, args.throughput)}
        results.append(row)
        print(f"throughput (qnli, {row['sentences']} sentences, {row['mean_tokens']:.1f} tokens, batch {row['batch']}): "
              f"full {row['full_sentences_per_s']:.1f}/s, trimmed {row['trimmed_sentences_per_s']:.1f}/s, "
              f"speedup {row['speedup']:.2f}x, flop ratio {row['flop_ratio']:.2f}x, kept {row['kept_fraction']:.3f}",
              flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

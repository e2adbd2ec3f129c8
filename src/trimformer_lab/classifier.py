"""Fine-tuned BERT classifiers on SST-2 / QNLI: loading a checkpoint folder, running dev batches with or
without pruning (predictions, kept share of token-layer computations, forward seconds), dev accuracy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trimformer.api import stats, trim, untrim
from trimformer.errors import InputError
from trimformer.pruners.tsdtp import TSDTPPruner, check_counts, set_counts

from .glue_data import collate, length_batches, load_examples, tokenize

BATCH = 32


def load_classifier(path: str | Path):
    """(Bert*ForSequenceClassification in eval mode, tokenizer) from a `train-task` checkpoint folder."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise InputError(f"{path} is not a checkpoint folder (no config.json); train one with `trimformer train-task`")
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def tsdtp_options(checkpoint: str | Path, counts: str | None = None) -> dict[str, Any]:
    """trim() options of a TS-DTP checkpoint folder: its pruner, its layers and "tsdtp_counts" (`counts`,
    "row" or "batch", default: the checkpoint's own), which `run_batches` applies after `trim`
    (`tsdtp.set_counts`)."""
    pruner = TSDTPPruner.load(checkpoint)
    return {"method": "tsdtp", "pruner": str(checkpoint), "layers": pruner.layers,
            "tsdtp_counts": check_counts(counts if counts is not None else pruner.config.counts)}


def run_batches(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], trim_options: dict | None,
                progress: bool = False, desc: str = "") -> tuple[torch.Tensor, float, float]:
    """Predictions (N,) in batch order, the kept share of token-layer computations over all batches and the
    seconds spent in the model's forwards (trim, untrim and `stats` not counted)."""
    if trim_options is not None:
        options = dict(trim_options)
        counts = options.pop("tsdtp_counts", None)
        trim(model, options)
        if counts is not None:
            set_counts(model, counts)
    preds, done, total, seconds = [], 0.0, 0.0, 0.0
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                start = time.perf_counter()
                logits = model(**inputs).logits
                seconds += time.perf_counter() - start
                preds.append(logits.argmax(-1))
                if trim_options is not None:
                    s = stats(model)
                    work = 2 * len(s["kept_tokens_per_layer"]) * sum(s["input_tokens"])
                    done += s["kept_fraction"] * work
                    total += work
    finally:
        if trim_options is not None:
            untrim(model)
    return torch.cat(preds), (done / total if total else 1.0), seconds


def evaluate_classifier(model, tokenizer, task: str, pruner: str | Path | None = None, data: str | None = None,
                        max_length: int = 128, progress: bool = True) -> dict[str, float]:
    """Accuracy and kept share on the dev split, TS-DTP dropping tokens for real when `pruner` is given."""
    batches, labels = dev_batches(tokenizer, task, data, max_length)
    options = tsdtp_options(pruner) if pruner is not None else None
    preds, kept, _ = run_batches(model, batches, options, progress, desc=f"dev {task}")
    return {"accuracy": float((preds == labels).float().mean()), "kept_fraction": kept, "examples": len(labels)}


def dev_batches(tokenizer, task: str, data: str | None = None, max_length: int = 128,
                batch: int = BATCH) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Length-sorted padded batches of the dev split and their labels (N,) in batch order."""
    items = tokenize(tokenizer, load_examples(task, "dev", data), max_length)
    batches = [collate(chunk, tokenizer.pad_token_id or 0) for chunk in length_batches(items, batch)]
    return batches, torch.cat([b["labels"] for b in batches])

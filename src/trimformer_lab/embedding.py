"""Sentence embeddings of an encoder: mean pooling, batched embedding, the full model beside a trimmed
one (cosine per sentence), and loading an encoder by embedded name or folder."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from trimformer.api import stats, trim, untrim
from trimformer.errors import InputError
from trimformer.loading import EMBEDDED_ENCODERS, load_model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D): the mean over real tokens (sentence-transformers' pooling)."""
    m = mask[:, :, None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embed(model, tokenizer, sentences: list[str], batch: int = 32, max_length: int = 128) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       token_type_ids=enc.get("token_type_ids")).last_hidden_state
        out.append(mean_pool(hidden, enc["attention_mask"]))
    return torch.cat(out)


@torch.inference_mode()
def embedding_fidelity(model, tokenizer, sentences: list[str], config: dict, batch: int = 32,
                       reference=None) -> dict:
    """Embed with the full and the trimmed model, batch by batch; cosine per sentence and summary.
    With `reference` (e.g. the original encoder when `model` was fine-tuned to work merged) the full
    embeddings come from `reference`, the trimmed ones from `model`."""
    cosines: list[float] = []
    kept, ratios = [], []
    for i in range(0, len(sentences), batch):
        chunk = sentences[i:i + batch]
        full = embed(model if reference is None else reference, tokenizer, chunk, batch)
        trim(model, dict(config))
        try:
            trimmed = embed(model, tokenizer, chunk, batch)
            s = stats(model)
        finally:
            untrim(model)
        cosines += torch.nn.functional.cosine_similarity(full, trimmed, dim=-1).tolist()
        kept.append((s["kept_fraction"], len(chunk)))
        ratios.append((s["flop_ratio"], len(chunk)))
    n = len(cosines)
    ordered = sorted(cosines)
    return {
        "sentences": n,
        "mean_cosine": statistics.fmean(cosines),
        "min_cosine": ordered[0],
        "p05_cosine": ordered[max(0, int(0.05 * n) - 1)],
        "kept_fraction": sum(k * c for k, c in kept) / n,
        "flop_ratio": sum(r * c for r, c in ratios) / n,
    }


def load_encoder(name_or_path: str):
    """(encoder, tokenizer): an embedded encoder name (e.g. minilm-l6) or a folder with an AutoModel."""
    if name_or_path in EMBEDDED_ENCODERS:
        return load_model(name_or_path)
    folder = Path(name_or_path)
    if not (folder / "config.json").exists():
        raise InputError(f"{name_or_path!r} is neither an embedded encoder ({', '.join(EMBEDDED_ENCODERS)}) "
                         "nor a folder with config.json")
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

"""Decoding for the evaluation: `decode` runs a `trimformer.generation.GreedyStream` with an optional stop
rule and the first steps' log-probabilities; a backend prefills and decodes one item with one variant
(`TrimformerBackend` trims before the prompt and untrims after; `benchmarks/kvpress_compare.py` brings a
kvpress one)."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from trimformer.api import is_trimmed, stats, trim, untrim
from trimformer.generation import GreedyStream
from trimformer.patch import prefill_plan
from trimformer.registry import resolve

from .variants import FULL, Variant


@dataclass
class Decoded:
    tokens: list[int]
    ttft_s: float
    total_s: float
    logprobs: list[torch.Tensor]     # next-token log-probabilities at the first steps (as asked)
    compute_share: float = 1.0       # share of the prefill's token-layer work done
    kv_share: float = 1.0            # share of the prompt's KV entries kept after the prefill (with
                                     # decode-time eviction: of all tokens seen, at the end of decoding)
    info: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def decode(stream: GreedyStream, stop: Callable[[list[int]], bool] | None = None, keep_logprobs: int = 0) -> Decoded:
    """The tokens of a one-row `stream` until it ends or `stop(tokens so far)` says so, with the
    log-probabilities of the first `keep_logprobs` distributions it computed (the prefill's first)."""
    kept: list[torch.Tensor] = []
    tokens: list[int] = []
    start = time.perf_counter()
    for token in stream:
        if len(kept) < keep_logprobs:
            kept.append(torch.log_softmax(stream.logits[0].float(), -1))
        tokens.append(int(token[0]))
        if stop is not None and stop(tokens):
            break
    if stream.finish_reason == "stop" and len(kept) < keep_logprobs:   # the distribution eos came from
        kept.append(torch.log_softmax(stream.logits[0].float(), -1))
    return Decoded(tokens, stream.ttft_s, time.perf_counter() - start, kept)


def greedy_decode(prefill: Callable[[], torch.Tensor], step: Callable[[torch.Tensor, int], torch.Tensor],
                  max_new_tokens: int, eos: Iterable[int] = (), stop: Callable[[list[int]], bool] | None = None,
                  keep_logprobs: int = 0) -> Decoded:
    """`decode` around two callables that keep their own cache: `prefill()` -> the last position's logits
    (1, V) or (1, 1, V), and `step(token (1, 1), i)` -> logits for the i-th new token. TTFT = prefill +
    first argmax."""
    stream = GreedyStream(None, max_new_tokens=max_new_tokens, eos_token_id=list(eos),
                          prefill=lambda: _last(prefill()), step=lambda token, i: _last(step(token, i)))
    return decode(stream, stop, keep_logprobs)


def _last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1] if logits.dim() == 3 else logits


def newline_stop(tokenizer) -> Callable[[list[int]], bool]:
    """Stop once the answer has a complete first line (leading newlines ignored), as the few-shot
    tasks score only that line."""
    def stop(tokens: list[int]) -> bool:
        if "\n" not in tokenizer.decode(tokens[-1:]):
            return False
        return "\n" in tokenizer.decode(tokens).lstrip("\n")
    return stop


class Backend(Protocol):
    name: str

    def describe(self, model, variant: Variant) -> dict[str, Any]:
        """What identifies the variant's results (its full configuration), plus "keep": a float."""

    def generate(self, model, variant: Variant, input_ids: torch.Tensor, max_new_tokens: int, eos: list[int],
                 stop=None, keep_logprobs: int = 0) -> Decoded:
        """Prefill and decode greedily with the variant; TTFT and the kept shares filled in."""


class TrimformerBackend:
    """The full model and every trimformer method; `trim` before the prompt, `untrim` after, always."""

    name = "trimformer"

    def describe(self, model, variant: Variant) -> dict[str, Any]:
        if variant.method == FULL:
            return {"method": FULL, "keep": 1.0}
        cfg = variant.trim_config()
        method = resolve(cfg)
        if method.prunes_prefill:
            plan = prefill_plan(model, cfg, method)     # what trim() will prune with
            keeps = list(plan.values())
            # `keep` of a schedule: the per-stage keep it equals on geometric average (= keep when uniform)
            keep = math.exp(sum(math.log(k) for k in keeps) / len(keeps)) if keeps else 1.0
        else:   # decode-time eviction only: the prompt is computed whole; `keep` is the KV budget share
            plan = {}
            keep = cfg.budget if isinstance(cfg.budget, float) else 1.0
        return {"method": variant.method, "keep": round(keep, 4), "config": dataclasses.asdict(cfg),
                "schedule": {str(k): v for k, v in plan.items()}}

    def generate(self, model, variant: Variant, input_ids, max_new_tokens, eos, stop=None, keep_logprobs=0):
        if variant.method == FULL:
            if is_trimmed(model):
                untrim(model)
            return decode(GreedyStream(model, input_ids, max_new_tokens, eos), stop, keep_logprobs)
        trim(model, variant.trim_config())
        try:
            decoded = decode(GreedyStream(model, input_ids, max_new_tokens, eos), stop, keep_logprobs)
            info = stats(model)
        finally:
            untrim(model)
        decoded.compute_share = float(info["kept_fraction"])
        decoded.kv_share = float(info["kept_fraction"])  # layer l keeps the KV of the tokens it computed
        if info.get("total_tokens_seen"):  # decode-time eviction: what the cache holds at the end
            decoded.kv_share = sum(row["in_cache"] for row in info["per_layer"]) / info["total_tokens_seen"]
        decoded.info = {"flop_ratio": info["flop_ratio"], "revived": info.get("revived", 0)}
        if "total_tokens_reintroduced" in info:   # decode-time eviction: the shadow set's traffic
            decoded.info.update(evicted=info["total_tokens_pruned"], readmitted=info["total_tokens_reintroduced"])
        return decoded

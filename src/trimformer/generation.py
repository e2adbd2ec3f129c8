"""Greedy decoding with the time to first token measured: the loop behind the demo, the CLI and the
benchmarks (`model.generate` works on a trimmed model too; this loop exists to time the prefill)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .patch.cache_names import cache_kwargs, output_cache


@dataclass
class Generation:
    tokens: list[int]     # generated token ids (eos excluded)
    ttft_s: float         # prefill forward + first token
    total_s: float


@torch.inference_mode()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
           attention_mask: torch.Tensor | None = None) -> Generation:
    """Greedy decoding of one prompt (1, T); returns the new tokens and the time to first token."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    start = time.perf_counter()
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1)
    ttft = time.perf_counter() - start
    tokens: list[int] = []
    cache = output_cache(out)
    mask = attention_mask
    for _ in range(max_new_tokens):
        if int(token[0]) in eos:
            break
        tokens.append(int(token[0]))
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1)
    return Generation(tokens, ttft, time.perf_counter() - start)

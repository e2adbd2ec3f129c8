"""The decode loop: a prompt's prefill, then one forward per new token, with the time to first token
measured. The CLI, the server, the demo, the evaluation harness and the benchmarks all decode through
`GreedyStream` (`model.generate` works on a trimmed model too; this loop exists to time the prefill and the
steps, and to let a caller stop between tokens).

    stream = GreedyStream(model, input_ids, max_new_tokens=32, eos_token_id=tokenizer.eos_token_id)
    for token in stream:        # (B,) the next token of every row, computed when asked for
        ...
    stream.ttft_s, stream.cache, stream.finish_reason
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .errors import InputError
from .patch.cache_names import cache_kwargs, output_cache

Logits = torch.Tensor          # (B, V): the last position's logits of every row


@dataclass
class Generation:
    tokens: list[int]     # generated token ids (eos excluded)
    ttft_s: float         # prefill forward + first token
    total_s: float


class GreedyStream:
    """Iterating decodes: each item is the next token of every row, (B,), and the forward that computes it
    runs only when it is asked for, so a caller that stops early (a stop string, a cancelled request, its
    own token budget) pays for no forward beyond the last token it takes.

    The stream ends before a token of `eos_token_id` (batch 1 only; not yielded, `finish_reason` "stop") or
    after `max_new_tokens` tokens (`finish_reason` "length"). Options, each off by default:

    * `choose(logits (B, V)) -> (B,)` picks the token instead of the argmax (sampling; or a look at every
      distribution the loop computes, prefill's included);
    * `on_prefill(cache)` runs once between the prefill and the first step (e.g. swapping the cache's
      layers for in-place ones);
    * `time_steps`: `step_s` collects the seconds of each step after the prefill (forward and choice only;
      what the caller does between tokens is not counted);
    * `prefill() -> logits (B, V)` and `step(token (B, 1), i) -> logits (B, V)` replace the model calls (a
      caller that keeps its own cache, e.g. a KV-compression library); `model` may then be None.

    Readable between tokens: `cache`, `logits` (what the last token was chosen from), `ttft_s` (prefill +
    first choice), `step_s`; after the end, `finish_reason`.
    """

    def __init__(self, model, input_ids: torch.Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None, *,
                 choose: Callable[[Logits], torch.Tensor] | None = None,
                 on_prefill: Callable[[Any], None] | None = None, time_steps: bool = False,
                 prefill: Callable[[], Logits] | None = None,
                 step: Callable[[torch.Tensor, int], Logits] | None = None):
        self.eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        rows = input_ids.shape[0] if input_ids is not None else 1
        if self.eos and rows != 1:
            raise InputError(f"eos_token_id stops a stream of one row; this one has {rows} (pass no eos_token_id "
                             "and cut each row at its first eos)")
        if prefill is None and (model is None or input_ids is None):
            raise InputError("GreedyStream needs a model and input_ids, or its own prefill and step")
        self.model, self.input_ids, self.attention_mask = model, input_ids, attention_mask
        self.max_new_tokens = max_new_tokens
        self.choose, self.on_prefill, self.time_steps = choose, on_prefill, time_steps
        self._prefill = prefill if prefill is not None else self._model_prefill
        self._step = step if step is not None else self._model_step
        self.cache: Any = None
        self.logits: Logits | None = None
        self.ttft_s: float | None = None
        self.step_s: list[float] = []
        self.finish_reason: str | None = None

    def _model_prefill(self) -> Logits:
        out = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=True,
                         logits_to_keep=1)
        self.cache = output_cache(out)
        return out.logits[:, -1]

    def _model_step(self, token: torch.Tensor, i: int) -> Logits:
        mask = self.attention_mask
        if mask is not None:
            mask = self.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = self.model(input_ids=token, attention_mask=mask, **cache_kwargs(self.cache), use_cache=True)
        self.cache = output_cache(out)
        return out.logits[:, -1]

    @torch.inference_mode()
    def __iter__(self) -> Iterator[torch.Tensor]:
        eos, choose, timed, step = self.eos, self.choose, self.time_steps, self._step
        start = time.perf_counter()
        logits = self._prefill()
        token = logits.argmax(-1) if choose is None else choose(logits)
        self.ttft_s = time.perf_counter() - start
        self.logits = logits
        if self.on_prefill is not None:
            self.on_prefill(self.cache)
        if self.max_new_tokens < 1:
            self.finish_reason = "length"
            return
        made = 0
        while True:
            if eos and int(token[0]) in eos:
                self.finish_reason = "stop"
                return
            yield token
            made += 1
            if made >= self.max_new_tokens:
                self.finish_reason = "length"
                return
            if timed:
                start = time.perf_counter()
            logits = step(token[:, None], made - 1)
            token = logits.argmax(-1) if choose is None else choose(logits)
            if timed:
                self.step_s.append(time.perf_counter() - start)
            self.logits = logits


def greedy(model, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
           attention_mask: torch.Tensor | None = None) -> Generation:
    """Greedy decoding of one prompt (1, T); returns the new tokens and the time to first token."""
    start = time.perf_counter()
    stream = GreedyStream(model, input_ids, max_new_tokens, eos_token_id, attention_mask)
    tokens = [int(token[0]) for token in stream]
    return Generation(tokens, stream.ttft_s if stream.ttft_s is not None else 0.0, time.perf_counter() - start)

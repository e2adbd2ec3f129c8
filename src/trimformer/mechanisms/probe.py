"""`Probe`: what a mechanism asks a layer's attention to compute besides its output.

The adapter hands a probe to the layer through its keyword arguments; the attention wrapper
(`patch/attention_hook.py`) fills it from the query and key tensors the layer computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Probe:
    """A request to score tokens at one layer; the attention wrapper fills `scores`."""

    scorer: Callable[..., torch.Tensor] | None   # (query, key, scaling) -> (B, K) scores, or None
    query_index: torch.Tensor | None      # (B, W) which query rows of each batch row to score with
    scores: torch.Tensor | None = None    # (B, K) filled by the wrapper
    keep_keys: bool = False               # also keep the layer's keys (for a scorer that reads them)
    keys: torch.Tensor | None = None      # (B, Hkv, K, hd) post-RoPE keys, filled when `keep_keys`
    extra: dict | None = None             # anything else a scorer keeps (e.g. the query, for readmission)
    # (query, key, value, scaling) -> (output (B, 1, H, hd), scores (B, K)): the layer's attention output
    # and the scores from one softmax, for a single query; used instead of the kernel where that is exact
    attend: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def capture(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        # query: (B, H, Q, hd), key: (B, Hkv, K, hd), both post-RoPE, key includes the cache
        if self.keep_keys:
            self.keys = key
        if self.scorer is None:
            return
        b, h, _, hd = query.shape
        index = self.query_index[:, None, :, None].expand(b, h, -1, hd)
        self.scores = self.scorer(query.gather(2, index), key, module.scaling)

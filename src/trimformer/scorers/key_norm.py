"""Key norm: tokens whose keys have a low L2 norm are kept (kvpress's KnormPress).

A key with a small norm tends to draw more attention across queries, so a low norm marks a token the
later layers will read. The score needs only the layer's keys, which the layer computes anyway: no
attention probabilities, no extra queries, no training.
"""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer, register


@register
class KeyNorm(Scorer):
    name = "key_norm"
    description = "tokens whose keys have a low L2 norm are kept (mean over KV heads); training-free"
    paper = "Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (2024)"
    needs = frozenset({"keys"})
    applies_to = frozenset({"decoder"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        keys = inputs.keys                                        # (B, Hkv, K, hd) post-RoPE
        return -keys.float().norm(dim=-1).mean(dim=1)             # (B, K): low norm scores high

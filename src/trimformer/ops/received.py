"""Attention received: how much attention each token gets from all live queries (encoders without [CLS])."""

from __future__ import annotations

import torch


def mean_attention_received(query: torch.Tensor, key: torch.Tensor, scaling: float, valid: torch.Tensor) -> torch.Tensor:
    """query, key (B, H, T, hd), valid (B, T) bool -> (B, T): softmax attention over the live keys, averaged
    over heads and over the live queries. Rows sum to 1; invalid slots get 0."""
    logits = torch.einsum("bhqd,bhkd->bhqk", query.float(), key.float()) * scaling          # (B, H, T, T)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1).mean(1)                                                     # (B, T, T)
    weights = valid.float() / valid.float().sum(-1, keepdim=True).clamp(min=1)             # (B, T)
    return torch.einsum("bq,bqk->bk", weights, probs)

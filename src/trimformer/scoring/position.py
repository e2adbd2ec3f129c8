"""Position-only scorers for the baselines: StreamingLLM-like recency, and head-and-tail truncation."""

from __future__ import annotations

import torch


def recency_scores(positions: torch.Tensor) -> torch.Tensor:
    """(B, K) -> (B, K): later tokens score higher (with protected sinks: StreamingLLM's keep set)."""
    return positions.float()


def head_tail_scores(positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, K), (B,) -> (B, K): tokens nearer either end of the prompt score higher (keep head and tail)."""
    pos = positions.float()
    from_end = lengths[:, None].float() - 1.0 - pos
    return -torch.minimum(pos, from_end)

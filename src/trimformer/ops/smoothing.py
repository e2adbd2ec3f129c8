"""Post-processing of scores shared by scorers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def span_max_pool(scores: torch.Tensor, span: int) -> torch.Tensor:
    """(B, K) -> (B, K): each token takes the max score of its `span` neighbours, so spans survive
    together rather than lone tokens (a needle sentence is kept whole when one of its tokens matters)."""
    if span <= 1:
        return scores
    return F.max_pool1d(scores[:, None, :], kernel_size=span, stride=1, padding=span // 2)[:, 0, :]

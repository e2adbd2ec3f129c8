"""Recency: later tokens score higher; with the protected sinks this is StreamingLLM's keep set."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer, register


@register
class Recency(Scorer):
    name = "recency"
    description = "attention sinks plus the most recent tokens"
    paper = "StreamingLLM (Xiao et al., 2023)"
    needs = frozenset({"positions"})
    applies_to = frozenset({"decoder"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.positions.float()              # (B, K)

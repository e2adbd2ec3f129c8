"""Head and tail: tokens nearer either end of the prompt score higher (truncation from the middle)."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer, register


@register
class HeadTail(Scorer):
    name = "head_tail"
    description = "keep the head and the tail of the prompt, drop from the middle"
    needs = frozenset({"positions"})
    applies_to = frozenset({"decoder"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        pos = inputs.positions.float()                                       # (B, K)
        from_end = inputs.lengths[:, None].float() - 1.0 - pos
        return -torch.minimum(pos, from_end)

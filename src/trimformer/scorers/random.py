"""Random scores: the control every informed scorer must beat."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer, register


def random_scores(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, K) positions -> (B, K) uniform scores, a seeded function of each token's original position,
    so a row gets the same scores whatever the batch around it (the same seed gives the same choice)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    table = torch.rand(int(positions.max()) + 1 if positions.numel() else 1, generator=generator)
    return table.to(positions.device)[positions.clamp(min=0)]


@register
class RandomScorer(Scorer):
    name = "random"
    description = "a seeded random choice of tokens (the baseline every scorer must beat)"
    needs = frozenset({"positions"})
    applies_to = frozenset({"decoder", "encoder", "seq2seq"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return random_scores(inputs.positions, inputs.seed + inputs.layer)

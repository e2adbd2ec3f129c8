"""Random scores: the control every informed scorer must beat."""

from __future__ import annotations

import torch


def random_scores(shape: tuple[int, int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, K) uniform scores from a seeded generator (the same seed gives the same choice)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(shape, generator=generator).to(device)

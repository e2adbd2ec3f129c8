"""LazyLLM's scorer: the attention the prompt's last queries pay each token (pooled over heads and queries)."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer, register


@register
class LastQueryAttention(Scorer):
    name = "last_query"
    description = "attention of the prompt's last `window` queries, max (or mean) over heads and queries"
    paper = "LazyLLM (Fu et al., 2024)"
    needs = frozenset({"attention"})
    applies_to = frozenset({"decoder"})
    smooth = True

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.attention                      # (B, K), computed by the layer's attention probe

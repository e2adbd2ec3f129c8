"""[CLS] attention: the attention the [CLS] query pays each token (encoders read through [CLS])."""

from __future__ import annotations

import torch

from .base import ScoreInputs, Scorer, register


@register
class ClsAttention(Scorer):
    name = "cls_attention"
    description = "attention of the [CLS] query (encoders; on decoders, the last queries' attention as in lazy)"
    paper = "Goyal et al., PoWER-BERT (2020); Kim et al., LTP (2022)"
    needs = frozenset({"attention"})
    applies_to = frozenset({"decoder", "encoder", "seq2seq"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.attention                      # (B, K), from the adapter's attention probe

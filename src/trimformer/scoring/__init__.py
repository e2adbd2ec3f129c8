"""Scorers: pure functions giving each live token an importance (tensors in, tensors out)."""

from .attention import attention_probs, last_query_attention, newest_query_attention, single_query_softmax
from .heavy_hitter import accumulate, shadow_attention
from .position import head_tail_scores, recency_scores
from .random import random_scores
from .smoothing import span_max_pool

__all__ = [
    "accumulate",
    "attention_probs",
    "shadow_attention",
    "head_tail_scores",
    "last_query_attention",
    "newest_query_attention",
    "random_scores",
    "recency_scores",
    "single_query_softmax",
    "span_max_pool",
]

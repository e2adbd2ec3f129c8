"""Heavy-hitter scores for decoding: the attention each cached token receives, accumulated with decay."""

from __future__ import annotations

import torch


def accumulate(previous: torch.Tensor, attention: torch.Tensor, decay: float) -> torch.Tensor:
    """previous (B, K_old), attention (B, K_new >= K_old) -> (B, K_new): decay x old + new, where slots
    added since the last call start from zero."""
    out = attention.clone()
    out[:, : previous.shape[1]].add_(previous, alpha=decay)
    return out


def shadow_attention(
    query: torch.Tensor,      # (B, H, 1, hd) the newest query (post-RoPE)
    keys: torch.Tensor,       # (B, Hkv, N, hd) shadow keys (post-RoPE, at their original positions)
    scaling: float,
    cache_lse: torch.Tensor,  # (B, H) log-sum-exp of the query's logits over the live cache
) -> torch.Tensor:            # (B, N) max over heads of the attention each shadow key would receive
    """Attention a shadow token would get if it were back in the cache (against the live cache's mass)."""
    b, h, _, hd = query.shape
    hkv = keys.shape[1]
    q = query.reshape(b, hkv, h // hkv, hd).float() * scaling                            # (B, Hkv, G, hd)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).reshape(b, h, -1)          # (B, H, N)
    # exp is increasing, so the max over heads is taken on the logits and exp runs on (B, N) only
    return torch.exp((logits - cache_lse[:, :, None]).amax(dim=1))

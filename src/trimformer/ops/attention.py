"""Attention of a few queries over a layer's keys, computed from queries and keys (no attention matrix
is ever asked of the model, so SDPA or flash kernels stay on for the layer itself)."""

from __future__ import annotations

import torch


def attention_logits(
    query: torch.Tensor,   # (B, H, W, hd)   post-RoPE queries of the scoring window
    key: torch.Tensor,     # (B, Hkv, K, hd) post-RoPE keys of the layer (cache included)
    scaling: float,
    q_pos: torch.Tensor,   # (B, W) original positions of the window queries
    k_pos: torch.Tensor,   # (B, K) original positions of the keys
    k_valid: torch.Tensor,  # (B, K) bool, False for padding / empty slots
) -> torch.Tensor:         # (B, H, W, K) scaled logits, -inf where a query may not look
    """Causal (by original position), padding-aware attention logits of `query` over `key` (GQA aware)."""
    b, h, w, hd = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, h // hkv, w, hd)                                   # (B, Hkv, G, W, hd)
    logits = torch.einsum("bhgwd,bhkd->bhgwk", q.float(), key.float()) * scaling  # (B, Hkv, G, W, K)
    allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])     # (B, W, K)
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    return logits.reshape(b, h, w, -1)


def single_query_softmax(
    query: torch.Tensor,    # (B, H, 1, hd) one post-RoPE query per row
    key: torch.Tensor,      # (B, Hkv, K, hd) post-RoPE keys (cache included)
    scaling: float,
    allowed: torch.Tensor | None,  # (B, K) bool: keys the query may look at (None: every key)
    with_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # probs (B, Hkv, G, K) float, lse (B, Hkv, G, 1) or None
    """Softmax attention of one query per row over its keys, grouped by KV head (GQA: head i uses KV head
    i // G), with the log-sum-exp of the logits when `with_lse`. One matmul on the keys as they are; no copy
    of them. (Scaling is folded into the query and the mask is skipped when every key is allowed: a
    decoding step calls this per layer, so each pass over the (B, Hkv, G, K) logits counts.)"""
    b, h, _, hd = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, h // hkv, hd) * scaling                               # (B, Hkv, G, hd)
    logits = torch.matmul(q, key.transpose(-1, -2))                                 # (B, Hkv, G, K)
    if logits.dtype != torch.float32:
        logits = logits.float()
    if allowed is not None and not bool(allowed.all()):
        logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not with_lse:
        return probs, None
    # lse = max logit - log(max prob): the largest prob is exp(max - lse) >= 1 / K, so this is exact to rounding
    lse = logits.amax(dim=-1, keepdim=True) - probs.amax(dim=-1, keepdim=True).log()
    return probs, lse


def attention_probs(query, key, scaling, q_pos, k_pos, k_valid) -> torch.Tensor:
    """(B, H, W, K) softmax of `attention_logits` over allowed keys; rows with none allowed are 0."""
    return torch.softmax(attention_logits(query, key, scaling, q_pos, k_pos, k_valid), dim=-1).nan_to_num(0.0)


def last_query_attention(
    query: torch.Tensor,    # (B, H, W, hd)
    key: torch.Tensor,      # (B, Hkv, K, hd)
    scaling: float,
    q_pos: torch.Tensor,    # (B, W)
    k_pos: torch.Tensor,    # (B, K)
    k_valid: torch.Tensor,  # (B, K)
    q_valid: torch.Tensor,  # (B, W) bool, False for padding queries
    pool: str = "max",
) -> torch.Tensor:          # (B, K) importance of each key slot
    """LazyLLM's score: the attention the last queries pay each token, pooled over heads and queries.

    ``pool="max"`` keeps a token that any head of any window query needs; ``"mean"`` averages.
    """
    probs = attention_probs(query, key, scaling, q_pos, k_pos, k_valid)   # (B, H, W, K)
    probs = probs * q_valid[:, None, :, None]
    if pool == "max":
        return probs.amax(dim=(1, 2))
    n = (q_valid.sum(-1) * probs.shape[1]).clamp(min=1)                    # (B,)
    return probs.sum(dim=(1, 2)) / n[:, None]


def newest_query_attention(
    query: torch.Tensor,    # (B, H, 1, hd) the newest token's query
    key: torch.Tensor,      # (B, Hkv, K, hd)
    scaling: float,
    q_pos: torch.Tensor,    # (B, 1)
    k_pos: torch.Tensor,    # (B, K)
    k_valid: torch.Tensor,  # (B, K)
) -> torch.Tensor:          # (B, K) max over heads of the newest query's attention
    """Attention of the token being decoded over a layer's cache, max over heads (for revival)."""
    return attention_probs(query, key, scaling, q_pos, k_pos, k_valid).amax(dim=(1, 2))


# ---- decoding: heavy hitters (accumulated attention) and the shadow set -------------------------
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

"""TS-DTP scoring: task-specific attention, combined with the layer's own [CLS] attention, and a dynamic
threshold. Pure functions, tensors in and tensors out; the learned parameters live in
`trimformer.pruners.tsdtp`.

A token's *keep weight* is 1 (live), 0 (padding or dropped) or, while training, anything in between (a soft
mask). Every function here reads the weights the same way, so the hard path (tokens gathered away) and the
soft path (tokens down-weighted in place) compute the same scores when the weights are 0/1.
"""

from __future__ import annotations

import math

import torch


def key_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) keep weights -> (B, 1, 1, T) additive attention bias: log(weight), the dtype's minimum at 0.
    A weight of 1 adds nothing; 0 removes the key exactly as dropping the token would."""
    low = torch.finfo(dtype).min
    bias = torch.where(keep > 0, keep.clamp(min=1e-12).log(), torch.full_like(keep, low))
    return bias.to(dtype)[:, None, None, :]


def task_attention(queries: torch.Tensor, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cumulative task-specific attention each token receives (TS-DTP's token importance).

    queries (B, T, R) = h W_task, features (B, T, R) = feature_layer(h), keep (B, T) weights ->
    (B, T): A[i, j] = softmax_j(q_i . f_j / sqrt(R) + log keep_j), averaged over queries i weighted by
    keep_i. Rows sum to 1 over the live tokens; tokens with weight 0 get 0.
    """
    logits = queries.float() @ features.float().transpose(1, 2) / math.sqrt(queries.shape[-1])  # (B, T, T)
    logits = logits + key_bias(keep.float(), torch.float32)[:, 0]                           # (B, 1, T)
    probs = logits.softmax(-1)
    weights = keep.float() / keep.float().sum(-1, keepdim=True).clamp(min=1e-12)            # (B, T)
    return torch.einsum("bi,bij->bj", weights, probs) * (keep > 0)


def combine(layer_attention: torch.Tensor, task_importance: torch.Tensor, mix: torch.Tensor | float) -> torch.Tensor:
    """(B, T) token scores: mix x the layer's [CLS] attention + (1 - mix) x the task-specific importance
    (both distributions over the live tokens)."""
    return mix * layer_attention.float() + (1 - mix) * task_importance.float()


def relative_log_scores(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T) log(score x live tokens): 0 is the uniform share, so one threshold fits every length."""
    n_live = keep.float().sum(-1, keepdim=True)                                              # (B, 1)
    return (scores.float().clamp(min=1e-12) * n_live).log()


def soft_keep(relative: torch.Tensor, threshold: torch.Tensor | float, temperature: float) -> torch.Tensor:
    """(B, T) differentiable keep probability sigmoid((z - threshold) / temperature) (training)."""
    return torch.sigmoid((relative - threshold) / temperature)


def threshold_counts(relative: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """(B,) tokens kept per row at inference: the protected ones and every other live token whose relative
    log score reaches the threshold (so the count follows the input, not a fixed ratio)."""
    above = valid & ~protected & (relative >= threshold)
    return above.sum(-1) + (protected & valid).sum(-1)


def kept_share(attn_tokens: torch.Tensor, mlp_tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Share of token-layer computations done, as `stats()` counts it: attn_tokens / mlp_tokens (L, B)
    tokens (or soft weights) in each layer's attention block and MLP, lengths (B,) -> scalar."""
    total = 2 * attn_tokens.shape[0] * lengths.float().sum()
    return (attn_tokens.sum() + mlp_tokens.sum()) / total.clamp(min=1)
